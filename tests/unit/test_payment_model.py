"""The payment state machine and its amount invariants, without any I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payment_grpc.domain.errors import IllegalTransition, RefundExceedsAvailable
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import (
    TRANSITIONS,
    CaptureMethod,
    Payment,
    PaymentMethod,
    PaymentMethodType,
    PaymentStatus,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
S = PaymentStatus


def _payment(amount: int = 10_000) -> Payment:
    return Payment(
        payment_id="pay_1",
        order_id="ord_1",
        customer_id="",
        amount=Money("USD", amount),
        capture_method=CaptureMethod.MANUAL,
        method=PaymentMethod(PaymentMethodType.CARD, token="tok_visa"),
        created_at=NOW,
        updated_at=NOW,
    )


def _move(payment: Payment, to: PaymentStatus, **changes: object) -> Payment:
    return payment.transition(to, action="test", actor="t", trace_id="", at=NOW, **changes)[0]


def _captured(amount: int = 10_000) -> Payment:
    authorized = _move(_move(_payment(amount), S.PROCESSING), S.AUTHORIZED)
    return _move(authorized, S.CAPTURED, captured_minor=amount)


@pytest.mark.parametrize(
    ("start", "target"),
    [(a, b) for a in S for b in S if b not in TRANSITIONS[a]],
)
def test_every_move_outside_the_table_is_illegal(
    start: PaymentStatus, target: PaymentStatus
) -> None:
    with pytest.raises(IllegalTransition) as raised:
        replace(_payment(), status=start).transition(
            target, action="x", actor="t", trace_id="", at=NOW
        )
    assert raised.value.metadata["currentStatus"] == start.value


def test_transition_bumps_the_sequence_and_describes_the_move() -> None:
    processing, event = _payment().transition(
        S.PROCESSING, action="charge", actor="svc", trace_id="ab", at=NOW
    )
    assert processing.sequence == 2
    assert (event.sequence, event.previous_status, event.status, event.actor) == (
        2,
        S.PENDING,
        S.PROCESSING,
        "svc",
    )


@given(st.lists(st.integers(min_value=1, max_value=4_000), max_size=8))
def test_refunds_never_exceed_the_captured_amount(amounts: list[int]) -> None:
    payment = _captured(10_000)
    for amount in amounts:
        try:
            payment.check_refund(Money("USD", amount), reserved_minor=0)
        except (RefundExceedsAvailable, IllegalTransition):
            continue
        payment = payment.after_refund(amount, "t", "", NOW)[0]
        assert 0 <= payment.refunded_minor <= payment.captured_minor <= payment.amount.amount_minor
    expected = (
        S.REFUNDED
        if payment.refunded_minor == 10_000
        else (S.PARTIALLY_REFUNDED if payment.refunded_minor else S.CAPTURED)
    )
    assert payment.status is expected
