"""The payment aggregate: statuses, the transition table, and its invariants.

Every change goes through `Payment.transition`, which checks the table, keeps
0 <= refunded <= captured <= amount, bumps the gap-free sequence and returns the
event to store in the same transaction.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from payment_grpc.domain.errors import (
    CaptureExceedsAuthorized,
    CurrencyMismatch,
    IllegalTransition,
    InvalidAmount,
    OperationInProgress,
    RefundExceedsAvailable,
)
from payment_grpc.domain.money import Money


class PaymentStatus(enum.StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    AUTHORIZED = "AUTHORIZED"
    CAPTURED = "CAPTURED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


S = PaymentStatus
TRANSITIONS: Mapping[PaymentStatus, frozenset[PaymentStatus]] = {
    S.PENDING: frozenset({S.PROCESSING, S.CANCELED}),
    S.PROCESSING: frozenset({S.AUTHORIZED, S.CAPTURED, S.FAILED}),
    S.AUTHORIZED: frozenset({S.CAPTURED, S.CANCELED}),
    S.CAPTURED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.PARTIALLY_REFUNDED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.REFUNDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELED: frozenset(),
}
# No further change is possible (REFUNDED) or expected without a refund (CAPTURED).
FINAL_STATUSES = frozenset({S.FAILED, S.CANCELED, S.REFUNDED})
SETTLED_STATUSES = FINAL_STATUSES | {S.CAPTURED, S.PARTIALLY_REFUNDED}
# Statuses that hold a captured amount.
CAPTURED_STATUSES = frozenset({S.CAPTURED, S.PARTIALLY_REFUNDED, S.REFUNDED})
# Statuses in which the gateway holds (or held, then captured) the authorization.
AUTHORIZED_STATUSES = CAPTURED_STATUSES | {S.AUTHORIZED}
# What an operator may settle a stuck payment to by hand (AdminService.ResolvePayment),
# always along TRANSITIONS: PENDING -> CANCELED, PROCESSING -> CAPTURED | FAILED,
# AUTHORIZED -> CANCELED.
RESOLUTION_STATUSES = frozenset({S.CAPTURED, S.FAILED, S.CANCELED})
RESOLVED_MANUALLY = "resolved_manually"
# Statuses that free the order for a new charge.
INACTIVE_STATUSES = frozenset({S.FAILED, S.CANCELED})


class CancellationReason(enum.StrEnum):
    REQUESTED = "REQUESTED"  # a caller's CancelPayment
    EXPIRED = "EXPIRED"  # held longer than AUTHORIZATION_HOLD_HOURS; voided by the service
    RESOLVED_MANUALLY = "RESOLVED_MANUALLY"  # an operator (AdminService.ResolvePayment)


class CaptureMethod(enum.StrEnum):
    AUTOMATIC = "AUTOMATIC"
    MANUAL = "MANUAL"


class PaymentMethodType(enum.StrEnum):
    CARD = "CARD"
    UPI = "UPI"
    WALLET = "WALLET"
    NET_BANKING = "NET_BANKING"
    PAYPAL = "PAYPAL"
    COD = "COD"


# Methods whose outcome arrives later, through a gateway callback.
ASYNC_METHOD_TYPES = frozenset(
    {PaymentMethodType.UPI, PaymentMethodType.NET_BANKING, PaymentMethodType.PAYPAL}
)


@dataclass(frozen=True, slots=True)
class PaymentMethod:
    """What the caller pays with, as sent to the gateway. `token` is a gateway token,
    a VPA or a payer token; never a card number."""

    type: PaymentMethodType
    token: str = ""
    wallet_provider: str = ""
    bank_code: str = ""


@dataclass(frozen=True, slots=True)
class CardDetails:
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    # The gateway's stable id of the card number (same card, same fingerprint): kept,
    # encrypted at rest, for duplicate and fraud checks; never sent to callers.
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class Failure:
    code: str
    message: str
    decline_code: str = ""


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    payment_id: str
    sequence: int
    previous_status: PaymentStatus | None
    status: PaymentStatus
    amount: Money
    captured: Money
    refunded: Money
    failure: Failure | None
    actor: str
    trace_id: str
    occurred_at: datetime
    reason: str = ""  # why, for changes made by hand (ResolvePayment)
    cancellation_reason: CancellationReason | None = None  # on a change that left it CANCELED


@dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str
    order_id: str
    customer_id: str
    amount: Money
    capture_method: CaptureMethod
    method: PaymentMethod
    created_at: datetime
    updated_at: datetime
    status: PaymentStatus = PaymentStatus.PENDING
    captured_minor: int = 0
    refunded_minor: int = 0
    card: CardDetails | None = None
    failure: Failure | None = None
    cancellation_reason: CancellationReason | None = None  # set exactly when CANCELED
    gateway_reference: str = ""
    sequence: int = 1
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Gateway operation claimed but not yet recorded ("capture", "cancel"): serializes
    # capture/cancel without holding a lock across the gateway call.
    in_flight: str = ""

    @property
    def captured(self) -> Money:
        return Money(self.amount.currency, self.captured_minor)

    @property
    def refunded(self) -> Money:
        return Money(self.amount.currency, self.refunded_minor)

    @property
    def authorized_minor(self) -> int:
        """What the gateway authorized: the whole amount once approved (no partial
        authorizations); nothing before, after a decline, or after a void."""
        return self.amount.amount_minor if self.status in AUTHORIZED_STATUSES else 0

    @property
    def refundable_minor(self) -> int:
        return self.captured_minor - self.refunded_minor

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def creation_event(self, actor: str, trace_id: str) -> PaymentEvent:
        return self._event(None, actor, trace_id, self.created_at)

    def transition(
        self,
        to: PaymentStatus,
        *,
        action: str,
        actor: str,
        trace_id: str,
        at: datetime,
        **changes: object,
    ) -> tuple[Payment, PaymentEvent]:
        """Move to `to`, applying `changes`; raises IllegalTransition if the table forbids it.
        A cancel states its reason; unstated, it is the caller's (REQUESTED)."""
        if to not in TRANSITIONS[self.status]:
            raise IllegalTransition(action, self.status.value)
        if to is S.CANCELED:
            changes.setdefault("cancellation_reason", CancellationReason.REQUESTED)
        moved = replace(self, status=to, sequence=self.sequence + 1, updated_at=at, **changes)  # type: ignore[arg-type]
        moved.check_invariants()
        return moved, moved._event(self.status, actor, trace_id, at)

    def noted(self, *, actor: str, trace_id: str, at: datetime) -> tuple[Payment, PaymentEvent]:
        """An event without a status change (e.g. a dispute opened at the PSP): the audit
        trail and the watchers learn of it; no money moves."""
        moved = replace(self, sequence=self.sequence + 1, updated_at=at)
        return moved, moved._event(self.status, actor, trace_id, at)

    def resolve(
        self, to: PaymentStatus, *, actor: str, trace_id: str, at: datetime, reason: str
    ) -> tuple[Payment, PaymentEvent]:
        """Settle a stuck payment by hand, only to a resolution status the transition
        table allows from here; a claimed gateway operation is given up (the operator
        decided its outcome)."""
        if to not in RESOLUTION_STATUSES:
            raise IllegalTransition("resolve", self.status.value)
        changes: dict[str, object] = {"in_flight": ""}
        if to is S.CAPTURED:
            changes["captured_minor"] = self.amount.amount_minor
        if to is S.FAILED:
            changes["failure"] = Failure(RESOLVED_MANUALLY, "settled by an operator")
        if to is S.CANCELED:
            changes["cancellation_reason"] = CancellationReason.RESOLVED_MANUALLY
        moved, event = self.transition(
            to, action="resolve", actor=actor, trace_id=trace_id, at=at, **changes
        )
        return moved, replace(event, reason=reason)

    def check_invariants(self) -> None:
        if not (
            0
            <= self.refunded_minor
            <= self.captured_minor
            <= self.authorized_minor
            <= self.amount.amount_minor
        ):
            raise AssertionError(f"amount invariant broken for {self.payment_id}")
        if self.status in CAPTURED_STATUSES and not self.captured_minor:
            raise AssertionError(f"{self.status} without a captured amount")
        if self.status is S.REFUNDED and self.refunded_minor != self.captured_minor:
            raise AssertionError("REFUNDED must refund the whole captured amount")
        if (
            self.status is S.PARTIALLY_REFUNDED
            and not 0 < self.refunded_minor < self.captured_minor
        ):
            raise AssertionError("PARTIALLY_REFUNDED needs 0 < refunded < captured")
        if self.status not in CAPTURED_STATUSES and self.captured_minor:
            raise AssertionError(f"{self.status} cannot hold a captured amount")
        if (self.status is S.CANCELED) != (self.cancellation_reason is not None):
            raise AssertionError("a cancellation reason is set exactly when CANCELED")

    def require(self, action: str, *allowed: PaymentStatus) -> None:
        if self.status not in allowed:
            raise IllegalTransition(action, self.status.value)

    def check_capture(self, amount: Money) -> None:
        self.require("capture", S.AUTHORIZED)
        if amount.amount_minor <= 0:
            raise InvalidAmount("a capture amount must be greater than 0")
        if not amount <= self.amount:
            raise CaptureExceedsAuthorized(
                amount.amount_minor, self.amount.amount_minor, self.amount.currency
            )

    def check_refund(self, amount: Money, reserved_minor: int) -> None:
        """`reserved_minor` is held by refunds still in flight at the gateway."""
        self.require("refund", S.CAPTURED, S.PARTIALLY_REFUNDED)
        available = self.refundable_minor - reserved_minor
        if amount.currency != self.amount.currency:
            raise CurrencyMismatch(self.amount.currency, amount.currency)
        if not 0 < amount.amount_minor <= available:
            raise RefundExceedsAvailable(amount.amount_minor, available, self.amount.currency)

    def after_refund(
        self, amount_minor: int, actor: str, trace_id: str, at: datetime
    ) -> tuple[Payment, PaymentEvent]:
        refunded = self.refunded_minor + amount_minor
        to = S.REFUNDED if refunded == self.captured_minor else S.PARTIALLY_REFUNDED
        return self.transition(
            to, action="refund", actor=actor, trace_id=trace_id, at=at, refunded_minor=refunded
        )

    def claim(self, operation: str) -> Payment:
        """Mark a gateway operation as in flight; a second one is refused until it ends."""
        if self.in_flight:
            raise OperationInProgress(self.payment_id, self.in_flight)
        return replace(self, in_flight=operation)

    def _event(
        self, previous: PaymentStatus | None, actor: str, trace_id: str, at: datetime
    ) -> PaymentEvent:
        return PaymentEvent(
            payment_id=self.payment_id,
            sequence=self.sequence,
            previous_status=previous,
            status=self.status,
            amount=self.amount,
            captured=self.captured,
            refunded=self.refunded,
            failure=self.failure,
            cancellation_reason=self.cancellation_reason,
            actor=actor,
            trace_id=trace_id,
            occurred_at=at,
        )
