"""The wire forms built faster (issue 12: encoding per call) are byte for byte what the
straightforward construction gives: each event's payment converted once per changed
payment and adjusted per event, Timestamps without Timestamp.FromDatetime."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from payments.v1 import events_pb2
from payments.v1 import resources_pb2 as pb

from payment_grpc.api import convert
from payment_grpc.api.events import encode_event
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import (
    CancellationReason,
    CaptureMethod,
    CardDetails,
    Failure,
    Payment,
    PaymentEvent,
    PaymentMethod,
    PaymentMethodType,
    PaymentStatus,
)
from payment_grpc.service.outbox import SAGA_EVENT_KEY, event_id, event_types
from payment_grpc.telemetry.tracing import traceparent_of_trace

S = PaymentStatus
T0 = datetime(2026, 12, 1, 13, 0, 0, 123456, tzinfo=UTC)
TRACE = "0af7651916cd43dd8448eb211c80319c"


def _reference_timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _reference_payment(p: Payment) -> pb.Payment:
    """payment_to_pb as it was written first (FromDatetime, the card copied in)."""
    details = pb.PaymentMethodDetails(
        type=convert.METHOD_TYPE_TO_PB[p.method.type],
        wallet_provider=p.method.wallet_provider,
        bank_code=p.method.bank_code,
    )
    if p.card is not None:
        details.card.CopyFrom(
            pb.CardDetails(
                brand=p.card.brand,
                last4=p.card.last4,
                exp_month=p.card.exp_month,
                exp_year=p.card.exp_year,
            )
        )
    return pb.Payment(
        payment_id=p.payment_id,
        order_id=p.order_id,
        customer_id=p.customer_id,
        amount=convert.money_to_pb(p.amount),
        captured_amount=convert.money_to_pb(p.captured),
        refunded_amount=convert.money_to_pb(p.refunded),
        status=convert.STATUS_TO_PB[p.status],
        capture_method=convert.CAPTURE_TO_PB[p.capture_method],
        payment_method=details,
        failure=convert.failure_to_pb(p.failure),
        gateway_reference=p.gateway_reference,
        sequence=p.sequence,
        create_time=_reference_timestamp(p.created_at),
        update_time=_reference_timestamp(p.updated_at),
        metadata=dict(p.metadata),
        description=p.description,
        cancellation_reason=convert.cancellation_to_pb(p.cancellation_reason),
    )


def _reference_event(payment: Payment, event: PaymentEvent, kind: str) -> bytes:
    """The envelope as first written: the whole payment as the event left it, converted."""
    as_of = replace(
        payment,
        status=event.status,
        captured_minor=event.captured.amount_minor,
        refunded_minor=event.refunded.amount_minor,
        failure=event.failure,
        cancellation_reason=event.cancellation_reason,
        sequence=event.sequence,
        updated_at=event.occurred_at,
    )
    message = events_pb2.PaymentEvent(
        event_id=event_id(event, kind),
        type=kind,
        payment=_reference_payment(as_of),
        sequence=event.sequence,
        previous_status=convert.STATUS_TO_PB.get(
            event.previous_status, pb.PAYMENT_STATUS_UNSPECIFIED
        ),
        occur_time=_reference_timestamp(event.occurred_at),
        trace=events_pb2.TraceContext(
            trace_id=event.trace_id, traceparent=traceparent_of_trace(event.trace_id)
        ),
    )
    return message.SerializeToString(deterministic=True)


def _new(payment_id: str, capture: CaptureMethod = CaptureMethod.AUTOMATIC) -> Payment:
    return Payment(
        payment_id=payment_id,
        order_id=f"ord-{payment_id}",
        customer_id="cus_1",
        amount=Money("USD", 1999),
        capture_method=capture,
        method=PaymentMethod(PaymentMethodType.CARD, token="tok_visa"),
        created_at=T0,
        updated_at=T0,
        description="two things",
        metadata={"b": "2", "a": "1", "cart": "x" * 40},
    )


def _move(
    payment: Payment, to: PaymentStatus, minutes: int, **changes: object
) -> tuple[Payment, PaymentEvent]:
    return payment.transition(
        to,
        action="test",
        actor="svc",
        trace_id=TRACE,
        at=T0 + timedelta(minutes=minutes),
        **changes,
    )


def _transactions() -> list[tuple[Payment, list[PaymentEvent]]]:
    """(the payment as a transaction left it, the events it wrote), as the event log gets
    them: one payment state for several events."""
    card = CardDetails("visa", "4242", 12, 2034, "fp_1")
    charged = replace(_new("pay_a"), metadata={SAGA_EVENT_KEY: "evt_1"})  # + completed
    processing, sent = _move(charged, S.PROCESSING, 0)
    captured, took = _move(
        processing, S.CAPTURED, 1, captured_minor=1999, card=card, gateway_reference="ch_1"
    )
    partly, refunded = _move(captured, S.PARTIALLY_REFUNDED, 2, refunded_minor=500)
    declined = _new("pay_b")
    trying, tried = _move(declined, S.PROCESSING, 0)
    failed, refused = _move(trying, S.FAILED, 1, failure=Failure("card_declined", "no", "funds"))
    held = _new("pay_c", CaptureMethod.MANUAL)
    asking, asked = _move(held, S.PROCESSING, 0)
    authorized, ok = _move(asking, S.AUTHORIZED, 1, card=card)
    canceled, voided = _move(
        authorized, S.CANCELED, 2, cancellation_reason=CancellationReason.EXPIRED
    )
    return [
        (processing, [charged.creation_event("svc", TRACE), sent]),
        (failed, [refused]),  # another payment in between: converted anew
        (captured, [took]),
        (partly, [refunded]),
        (trying, [declined.creation_event("svc", ""), tried]),
        (authorized, [asked, ok]),  # a state and an event of an earlier state
        (canceled, [voided]),
    ]


def test_each_event_is_the_envelope_of_the_payment_as_it_left_it() -> None:
    checked = 0
    for payment, events in _transactions():
        for event in events:
            for kind in event_types(payment, event):
                assert encode_event(payment, event, kind) == _reference_event(payment, event, kind)
                checked += 1
    assert checked == 11


def test_an_answer_converts_a_payment_as_before() -> None:
    for payment, _events in _transactions():
        assert convert.payment_to_pb(payment).SerializeToString(
            deterministic=True
        ) == _reference_payment(payment).SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    "at",
    [
        T0,
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 1, 15, 30, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 12, 1, 15, 30, 0, 500000),  # naive: UTC, as FromDatetime takes it
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_a_timestamp_is_what_from_datetime_gives(at: datetime) -> None:
    assert convert.timestamp(at) == _reference_timestamp(at)
