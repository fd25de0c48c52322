"""Stateful property test of the payment aggregate, checked against a reference model.

Hypothesis drives one Payment through any sequence of the operations the use cases
perform (charge, gateway outcomes, capture, cancel, refund, in-flight claims). Every
domain refusal must leave the payment untouched, every accepted move must match an
independent transition table written from the design's state diagram, and the amount,
status and sequence invariants must hold after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from payment_grpc.domain.errors import (
    CaptureExceedsAuthorized,
    CurrencyMismatch,
    DomainError,
    IllegalTransition,
    InvalidAmount,
    OperationInProgress,
    RefundExceedsAvailable,
)
from payment_grpc.domain.money import CURRENCY_EXPONENTS, Money
from payment_grpc.domain.payment import (
    FINAL_STATUSES,
    TRANSITIONS,
    CaptureMethod,
    Failure,
    Payment,
    PaymentEvent,
    PaymentMethod,
    PaymentMethodType,
    PaymentStatus,
)

S = PaymentStatus
START = datetime(2026, 1, 1, tzinfo=UTC)
CURRENCIES = sorted(CURRENCY_EXPONENTS)
REFUSALS = (
    IllegalTransition,
    InvalidAmount,
    RefundExceedsAvailable,
    CaptureExceedsAuthorized,
    CurrencyMismatch,
    OperationInProgress,
)

# The reference: allowed moves copied from the design's state diagram, not from the code.
REFERENCE_MOVES: dict[PaymentStatus, frozenset[PaymentStatus]] = {
    S.PENDING: frozenset({S.PROCESSING, S.CANCELED}),
    S.PROCESSING: frozenset({S.AUTHORIZED, S.CAPTURED, S.FAILED}),
    S.AUTHORIZED: frozenset({S.CAPTURED, S.CANCELED}),
    S.CAPTURED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.PARTIALLY_REFUNDED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.REFUNDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELED: frozenset(),
}
REFERENCE_FINAL = frozenset({S.FAILED, S.CANCELED, S.REFUNDED})
HOLDS_CAPTURE = frozenset({S.CAPTURED, S.PARTIALLY_REFUNDED, S.REFUNDED})


@dataclass
class Model:
    """What the payment should look like, maintained independently of the domain code."""

    amount: int
    currency: str
    status: PaymentStatus = S.PENDING
    captured: int = 0
    refunded: int = 0
    sequence: int = 1
    in_flight: str = ""

    def allows(self, to: PaymentStatus) -> bool:
        return to in REFERENCE_MOVES[self.status]


def _other_currency(currency: str, index: int) -> str:
    others = [c for c in CURRENCIES if c != currency]
    return others[index % len(others)]


class PaymentMachine(RuleBasedStateMachine):
    payment: Payment
    model: Model

    def __init__(self) -> None:
        super().__init__()
        self.clock = START

    # ------------------------------------------------------------ helpers

    def _now(self) -> datetime:
        self.clock += timedelta(seconds=1)
        return self.clock

    def _move(
        self, payment: Payment, to: PaymentStatus, action: str, **changes: object
    ) -> tuple[Payment, PaymentEvent]:
        return payment.transition(
            to, action=action, actor="machine", trace_id="tr", at=self._now(), **changes
        )

    def _refused(
        self, before: Payment, error: DomainError, expected: type[DomainError] | None
    ) -> None:
        """A refusal must be the one the reference predicts and must change nothing."""
        assert expected is not None, f"refused a move the reference accepts: {error!r}"
        assert isinstance(error, expected), f"expected {expected.__name__}, got {error!r}"
        assert self.payment is before
        assert self.payment == before

    def _accepted(self, before: Payment, after: Payment, event: PaymentEvent) -> None:
        """Check one accepted transition against the model (already advanced) and keep it."""
        model = self.model
        assert after.status is model.status
        assert after.sequence == before.sequence + 1 == model.sequence
        assert (after.captured_minor, after.refunded_minor) == (model.captured, model.refunded)
        assert event.payment_id == after.payment_id
        assert event.sequence == after.sequence
        assert event.previous_status is before.status
        assert event.status is after.status
        assert event.amount == after.amount == before.amount
        assert event.captured == Money(model.currency, model.captured)
        assert event.refunded == Money(model.currency, model.refunded)
        assert event.failure == after.failure
        assert event.occurred_at == after.updated_at
        self.payment = after

    def _advance(self, to: PaymentStatus, **amounts: int) -> None:
        self.model.status = to
        self.model.sequence += 1
        self.model.captured = amounts.get("captured", self.model.captured)
        self.model.refunded = amounts.get("refunded", self.model.refunded)

    def _expect_transition(self, to: PaymentStatus, action: str, **changes: object) -> None:
        """Try a bare table move (what the use cases do after a gateway answer)."""
        before = self.payment
        if not self.model.allows(to):
            try:
                self._move(before, to, action, **changes)
            except IllegalTransition as error:
                self._refused(before, error, IllegalTransition)
                return
            raise AssertionError(f"{before.status} -> {to} accepted; the design forbids it")
        try:
            after, event = self._move(before, to, action, **changes)
        except IllegalTransition as error:
            raise AssertionError(
                f"{before.status} -> {to} refused; the design allows it"
            ) from error
        captured = changes.get("captured_minor", self.model.captured)
        refunded = changes.get("refunded_minor", self.model.refunded)
        assert isinstance(captured, int)
        assert isinstance(refunded, int)
        self._advance(to, captured=captured, refunded=refunded)
        self._accepted(before, after, event)

    # ------------------------------------------------------------ start

    @initialize(
        amount=st.integers(min_value=1, max_value=10**9),
        currency=st.sampled_from(CURRENCIES),
        capture_method=st.sampled_from(CaptureMethod),
        method_type=st.sampled_from(PaymentMethodType),
    )
    def create(
        self,
        amount: int,
        currency: str,
        capture_method: CaptureMethod,
        method_type: PaymentMethodType,
    ) -> None:
        self.payment = Payment(
            payment_id="pay_sm",
            order_id="ord_sm",
            customer_id="cus_sm",
            amount=Money(currency, amount),
            capture_method=capture_method,
            method=PaymentMethod(method_type, token="tok"),
            created_at=START,
            updated_at=START,
        )
        self.model = Model(amount=amount, currency=currency)
        event = self.payment.creation_event("machine", "tr")
        assert (event.sequence, event.previous_status, event.status) == (1, None, S.PENDING)

    # ------------------------------------------------------------ charge and gateway outcomes

    @rule(
        outcome=st.sampled_from([S.AUTHORIZED, S.CAPTURED, S.FAILED, S.PROCESSING]),
        code=st.sampled_from(["card_declined", "expired_card", "processing_error"]),
    )
    def charge(self, outcome: PaymentStatus, code: str) -> None:
        """The charge use case: a PENDING payment is sent (-> PROCESSING), then the
        gateway's outcome is recorded: authorized, captured in full, or failed. In any
        other status the outcome is a late or duplicate answer (or a resend, when
        `outcome` is PROCESSING) and must be refused."""
        before = self.payment
        if self.model.status is S.PENDING:
            self._expect_transition(S.PROCESSING, "charge")
        elif outcome is S.CAPTURED:
            self._expect_transition(outcome, "charge", captured_minor=self.model.amount)
        elif outcome is S.FAILED:
            failure = Failure(code=code, message="declined by the gateway", decline_code="generic")
            self._expect_transition(outcome, "charge", failure=failure)
            if self.payment is not before:
                assert self.payment.failure == failure
        else:
            self._expect_transition(outcome, "charge")

    # ------------------------------------------------------------ capture

    @rule(
        kind=st.sampled_from(["full", "partial", "over", "zero", "other_currency"]),
        fraction=st.integers(min_value=1, max_value=10**9),
    )
    def capture(self, kind: str, fraction: int) -> None:
        model, before = self.model, self.payment
        if kind == "full":
            amount = Money(model.currency, model.amount)
        elif kind == "partial":
            amount = Money(model.currency, 1 + fraction % model.amount)
        elif kind == "over":
            amount = Money(model.currency, model.amount + fraction)
        elif kind == "zero":
            amount = Money(model.currency, 0)
        else:
            amount = Money(_other_currency(model.currency, fraction), 1 + fraction % model.amount)

        if model.status is not S.AUTHORIZED:
            expected: type[DomainError] | None = IllegalTransition
        elif amount.amount_minor == 0:
            expected = InvalidAmount
        elif amount.currency != model.currency:
            expected = CurrencyMismatch
        elif amount.amount_minor > model.amount:
            expected = CaptureExceedsAuthorized
        elif model.in_flight:
            expected = OperationInProgress
        else:
            expected = None

        try:
            before.check_capture(amount)
            claimed = before.claim(f"capture:{amount.amount_minor}")
        except REFUSALS as error:
            self._refused(before, error, expected)
            return
        assert expected is None, f"capture of {amount} accepted; expected {expected.__name__}"
        assert claimed.in_flight == f"capture:{amount.amount_minor}"
        # The gateway confirmed: release the claim and record the capture.
        after, event = self._move(
            replace(claimed, in_flight=""),
            S.CAPTURED,
            "capture",
            captured_minor=amount.amount_minor,
        )
        assert model.allows(S.CAPTURED)
        self._advance(S.CAPTURED, captured=amount.amount_minor)
        self._accepted(before, after, event)

    # ------------------------------------------------------------ cancel

    @rule()
    def cancel(self) -> None:
        model, before = self.model, self.payment
        if model.status not in {S.PENDING, S.AUTHORIZED}:
            expected: type[DomainError] | None = IllegalTransition
        elif model.status is S.AUTHORIZED and model.in_flight:
            expected = OperationInProgress
        else:
            expected = None
        try:
            before.require("cancel", S.PENDING, S.AUTHORIZED)
            if before.status is S.PENDING:
                source = before  # never sent to the gateway: cancel it directly
            else:
                claimed = before.claim("cancel")
                assert claimed.in_flight == "cancel"
                source = replace(claimed, in_flight="")  # the void succeeded: release
        except REFUSALS as error:
            self._refused(before, error, expected)
            return
        assert expected is None, f"cancel accepted; expected {expected.__name__}"
        after, event = self._move(source, S.CANCELED, "cancel")
        assert model.allows(S.CANCELED)
        self._advance(S.CANCELED)
        self._accepted(before, after, event)

    # ------------------------------------------------------------ refund

    @rule(
        kind=st.sampled_from(
            ["rest", "all_but_one", "one", "partial", "over", "zero", "other_currency"]
        ),
        fraction=st.integers(min_value=0, max_value=10**9),
    )
    def refund(self, kind: str, fraction: int) -> None:
        model, before = self.model, self.payment
        available = model.captured - model.refunded
        minor = {
            "rest": available,
            "all_but_one": max(available - 1, 0),
            "one": 1,
            "partial": 1 + fraction % max(available, 1),
            "over": available + 1 + fraction,
            "zero": 0,
            "other_currency": max(available, 1),
        }[kind]
        currency = (
            _other_currency(model.currency, fraction)
            if kind == "other_currency"
            else model.currency
        )
        amount = Money(currency, minor)

        if model.status not in {S.CAPTURED, S.PARTIALLY_REFUNDED}:
            expected: type[DomainError] | None = IllegalTransition
        elif currency != model.currency:
            expected = CurrencyMismatch
        elif not 0 < minor <= available:
            expected = RefundExceedsAvailable
        else:
            expected = None

        try:
            before.check_refund(amount, reserved_minor=0)
        except REFUSALS as error:
            self._refused(before, error, expected)
            return
        assert expected is None, f"refund of {amount} accepted; expected {expected.__name__}"
        after, event = before.after_refund(minor, "machine", "tr", self._now())
        refunded = model.refunded + minor
        to = S.REFUNDED if refunded == model.captured else S.PARTIALLY_REFUNDED
        assert model.allows(to), f"{model.status} -> {to} by refund; the design forbids it"
        self._advance(to, refunded=refunded)
        self._accepted(before, after, event)

    # ------------------------------------------------------------ in-flight claims

    @rule(operation=st.sampled_from(["capture:1", "cancel"]))
    def claim(self, operation: str) -> None:
        before = self.payment
        try:
            claimed = before.claim(operation)
        except OperationInProgress as error:
            self._refused(before, error, OperationInProgress if self.model.in_flight else None)
            return
        assert not self.model.in_flight, "a second claim was accepted"
        assert claimed.in_flight == operation
        # A claim changes nothing else: no status move, no event, no sequence bump.
        assert replace(claimed, in_flight="") == replace(before, in_flight="")
        self.model.in_flight = operation
        self.payment = claimed

    @precondition(lambda self: bool(self.model.in_flight))
    @rule(confirmed=st.booleans())
    def gateway_answers_claim(self, confirmed: bool) -> None:
        """The claimed operation's answer. Rejected: release the claim, nothing else
        changes. Confirmed: record the move; one the table forbids rolls back untouched."""
        operation, before = self.model.in_flight, self.payment
        if not confirmed:
            self.payment = replace(before, in_flight="")
            self.model.in_flight = ""
            return
        if operation == "cancel":
            self._expect_transition(S.CANCELED, "cancel", in_flight="")
        else:
            captured = int(operation.removeprefix("capture:"))
            self._expect_transition(S.CAPTURED, "capture", captured_minor=captured, in_flight="")
        if self.payment is not before:  # recorded: the claim ended with the move
            self.model.in_flight = ""

    # ------------------------------------------------------------ invariants

    @invariant()
    def matches_the_model(self) -> None:
        p, m = self.payment, self.model
        assert (p.status, p.captured_minor, p.refunded_minor) == (m.status, m.captured, m.refunded)
        assert (p.sequence, p.in_flight) == (m.sequence, m.in_flight)
        assert p.amount == Money(m.currency, m.amount)

    @invariant()
    def amounts_are_ordered(self) -> None:
        p = self.payment
        assert (
            0 <= p.refunded_minor <= p.captured_minor <= p.authorized_minor <= p.amount.amount_minor
        )
        assert p.authorized_minor in (0, p.amount.amount_minor)  # no partial authorizations
        authorized = p.status in (S.AUTHORIZED, S.CAPTURED, S.PARTIALLY_REFUNDED, S.REFUNDED)
        assert (p.authorized_minor > 0) == authorized
        assert p.refundable_minor == p.captured_minor - p.refunded_minor
        assert p.captured == Money(p.amount.currency, p.captured_minor)
        assert p.refunded == Money(p.amount.currency, p.refunded_minor)

    @invariant()
    def status_agrees_with_amounts(self) -> None:
        p = self.payment
        captured, refunded = p.captured_minor, p.refunded_minor
        if p.status is S.CAPTURED:
            assert captured > 0
            assert refunded == 0
        elif p.status is S.PARTIALLY_REFUNDED:
            assert 0 < refunded < captured
        elif p.status is S.REFUNDED:
            assert refunded == captured > 0
        else:
            assert p.status not in HOLDS_CAPTURE
            assert captured == 0
            assert refunded == 0
        assert (p.failure is not None) == (p.status is S.FAILED)
        p.check_invariants()

    @invariant()
    def forbidden_moves_are_refused(self) -> None:
        """Every move outside the reference table (all of them from a final status, and
        any move back to PENDING) is refused before anything changes."""
        p = self.payment
        assert p.is_final == (p.status in REFERENCE_FINAL)
        if p.is_final:
            assert not REFERENCE_MOVES[p.status]
        for to in S:
            if to in REFERENCE_MOVES[p.status]:
                continue
            try:
                p.transition(to, action="probe", actor="machine", trace_id="", at=self.clock)
            except IllegalTransition:
                continue
            raise AssertionError(f"{p.status} accepted a move to {to}; the design forbids it")


def test_transition_table_is_the_designed_one() -> None:
    """The deterministic half of the model check: the code's table is the diagram."""
    assert dict(TRANSITIONS) == REFERENCE_MOVES
    assert FINAL_STATUSES == REFERENCE_FINAL


TestPaymentStateMachine = PaymentMachine.TestCase
TestPaymentStateMachine.settings = settings(max_examples=600, stateful_step_count=20, deadline=None)
