"""Ports: what the use cases need from the outside world. Adapters implement them."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol

from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import (
    CardDetails,
    Failure,
    Payment,
    PaymentEvent,
    PaymentMethod,
    PaymentMethodType,
    PaymentStatus,
)
from payment_grpc.domain.refund import Refund
from payment_grpc.service.errors import ServiceError

# ---------------------------------------------------------------- gateway


class GatewayError(ServiceError):
    """A gateway call failed as a call (a business answer such as a decline is a result,
    not an error). Adapters raise only this family, mapped once at their edge."""

    reason = "GATEWAY_ERROR"


class GatewayTimeout(GatewayError):
    """The request may have reached the gateway; its outcome is unknown. Repeat it with
    the same idempotency key, or look it up."""

    reason = "GATEWAY_TIMEOUT"


class GatewayUnreachable(GatewayError):
    """Nothing was sent (connection refused, gateway down): safe to retry."""

    reason = "GATEWAY_UNAVAILABLE"


class GatewayRefused(GatewayError):
    """The gateway refused the call itself (invalid request, bad credentials): it did
    nothing, and repeating the same call will not help."""

    reason = "GATEWAY_REFUSED"


# The gateway did not say what happened: the change stays open for a retry or recovery.
NO_ANSWER = (GatewayTimeout, GatewayUnreachable)


class GatewayCircuitOpen(GatewayUnreachable):
    """The breaker is open: nothing was sent; try again after its wait."""


class AuthorizationOutcome(enum.StrEnum):
    AUTHORIZED = "AUTHORIZED"
    CAPTURED = "CAPTURED"
    DECLINED = "DECLINED"
    PENDING = "PENDING"  # asynchronous methods: the result comes through a callback


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    idempotency_key: str
    payment_id: str
    amount: Money
    method: PaymentMethod
    capture: bool


@dataclass(frozen=True, slots=True)
class Authorization:
    outcome: AuthorizationOutcome
    reference: str
    card: CardDetails | None = None
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class GatewayResult:
    succeeded: bool
    reference: str = ""
    failure: Failure | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """An asynchronous authorization finished at the gateway."""

    payment_id: str
    authorization: Authorization


class GatewayNews(Protocol):
    """Inbound port: what a gateway tells us on its own (an asynchronous method settled;
    later webhooks). Adapters that receive news are given it; a use case implements it."""

    async def settled(self, settlement: Settlement) -> None: ...


class NoticeKind(enum.StrEnum):
    """What an inbound gateway event (a webhook) tells us."""

    AUTHORIZATION = "AUTHORIZATION"  # where an authorization stands now
    DISPUTE_OPENED = "DISPUTE_OPENED"  # the payer disputes the charge; no money moves here
    OTHER = "OTHER"  # acknowledged, nothing to change


@dataclass(frozen=True, slots=True)
class GatewayNotice:
    """A verified event from the gateway, in our words."""

    event_id: str
    event_type: str
    kind: NoticeKind
    payment_id: str | None  # None: the gateway object names no payment of ours
    authorization: Authorization | None = None
    detail: str = ""  # e.g. the dispute id and reason, for the audit trail


class GatewayEventRepository(Protocol):
    async def add(self, notice: GatewayNotice, received_at: datetime) -> bool:
        """Record the event id; False if it was processed before."""
        ...

    async def seen(self, event_id: str) -> bool: ...


class PaymentGateway(Protocol):
    """Outbound only: the calls we make. What the gateway tells us arrives through
    GatewayNews."""

    async def authorize(self, request: AuthorizationRequest) -> Authorization: ...

    async def capture(
        self, reference: str, amount: Money, idempotency_key: str
    ) -> GatewayResult: ...

    async def void(self, reference: str, idempotency_key: str) -> GatewayResult: ...

    async def refund(
        self, reference: str, amount: Money, idempotency_key: str
    ) -> GatewayResult: ...

    async def lookup(self, idempotency_key: str) -> Authorization | None:
        """The authorization recorded under our key, or None if the gateway never saw it."""
        ...

    def available(self) -> bool:
        """False while a circuit breaker keeps calls away from the gateway."""
        ...

    async def healthy(self) -> bool: ...


class Lifecycle(Protocol):
    """What the composition root starts before serving and closes after: adapters that
    hold connections or tasks (gateways, buses) share it instead of type checks."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------- orders


@dataclass(frozen=True, slots=True)
class Order:
    """An order as the order service describes it (its currency is not validated here)."""

    order_id: str
    customer_id: str
    currency: str
    total_minor: int
    payable: bool


class OrderDirectory(Protocol):
    async def get_order(self, order_id: str) -> Order | None:
        """The order, None if the order service does not know it; raises
        OrderServiceUnavailable when it cannot answer (down, too slow, breaker open)."""
        ...


# ---------------------------------------------------------------- outbox and sinks


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One payment event waiting for delivery to one sink."""

    row_id: int
    sink: str
    dedupe_id: str  # <payment_id>:<sequence>, the same for every redelivery
    payment_id: str
    sequence: int
    event_type: str  # e.g. "payment.captured"
    payload: bytes  # a serialized payments.v1.PaymentEvent
    attempts: int  # failed deliveries so far


@dataclass(frozen=True, slots=True)
class ChargeRefusal:
    """A charge refused outright, so that no payment exists: the checkout saga's
    `payment.failed` for an inventory event (service/saga.py). Written to the outbox by the
    unit of work that stores the event's idempotency key answer, in that transaction."""

    event_id: str  # the dedupe id, `inventory:<inventory event id>:failed` (outbox.py)
    inventory_event_id: str
    order_id: str
    reason: str  # the refusal's machine-readable reason, e.g. ORDER_NOT_FOUND
    message: str
    trace_id: str
    occurred_at: datetime


class SinkUnavailable(Exception):
    """The sink did not take the message; the relay tries again later."""


class EventSink(Protocol):
    """Where the relay delivers payment events: all it knows of a broker or a service.
    Delivery is at least once; the sink passes `dedupe_id` on so receivers drop repeats."""

    @property
    def name(self) -> str: ...

    def wants(self, event_type: str) -> bool:
        """Whether events of this type are written to the outbox for this sink."""
        ...

    async def start(self) -> None: ...

    async def deliver(self, message: OutboxMessage) -> None:
        """Raises SinkUnavailable when the message was not taken."""
        ...

    async def close(self) -> None: ...


class OutboxStore(Protocol):
    async def claim(
        self,
        owner: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
        exclude: Collection[int] = (),
    ) -> list[OutboxMessage]:
        """Due messages nobody holds, at most one per (sink, payment): the earliest
        undelivered sequence of each; held by `owner` until `lease_until`. Never the rows
        in `exclude` (the caller's deliveries still under way)."""
        ...

    async def delivered(self, message: OutboxMessage, now: datetime) -> None: ...

    async def failed(
        self, message: OutboxMessage, owner: str, error: str, retry_at: datetime | None
    ) -> None:
        """Record a failed attempt: due again at `retry_at`, or parked when it is None."""
        ...

    async def next_due(self) -> datetime | None:
        """When the earliest pending message is due (None: nothing pending)."""
        ...

    async def backlog(self) -> dict[str, tuple[datetime | None, int]]:
        """Per sink with rows: when its oldest undelivered (pending) message was written,
        and how many are parked."""
        ...


# ---------------------------------------------------------------- change feed

ALL_PAYMENTS = "*"  # a StatusBus key: woken by every payment's changes


@dataclass(frozen=True, slots=True)
class FeedFilter:
    order_id: str = ""
    customer_id: str = ""
    statuses: frozenset[PaymentStatus] = frozenset()


class FeedPosition(NamedTuple):
    """An entry's place in the feed, ordered as a tuple: (tx, id). `tx` is a horizon value
    of the writing transaction on PostgreSQL (0 on SQLite and for entries written before
    revision 0011), `id` the entry's row id. An entry is handed out only once no entry can
    still appear below it, so this order never changes for what a reader has seen."""

    tx: int
    id: int


FEED_START = FeedPosition(0, 0)  # before every entry


@dataclass(frozen=True, slots=True)
class FeedEntry:
    position: FeedPosition
    payload: bytes  # a serialized payments.v1.PaymentEvent


@dataclass(frozen=True, slots=True)
class FeedRead:
    entries: list[FeedEntry]
    held: bool  # more entries have committed but wait for older transactions to end


class PaymentFeed(Protocol):
    async def after(self, position: FeedPosition, where: FeedFilter, limit: int) -> FeedRead:
        """Entries after `position` that match and are final (nothing can still commit
        below them), in position order."""
        ...


# ---------------------------------------------------------------- persistence


@dataclass(frozen=True, slots=True)
class PaymentFilter:
    order_id: str = ""
    customer_id: str = ""
    status: PaymentStatus | None = None


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Position after the last row of a page: (created_at, id) of that row."""

    created_at: datetime
    last_id: str


@dataclass(frozen=True, slots=True)
class StatsGroup:
    """Payments with one status, method type and currency: how many, and their sums."""

    status: PaymentStatus
    method_type: PaymentMethodType
    currency: str
    payment_count: int
    amount_minor: int
    captured_minor: int
    refunded_minor: int


class PaymentRepository(Protocol):
    async def add(self, payment: Payment, events: Sequence[PaymentEvent]) -> None:
        """Insert; raises ActivePaymentExists if the order already has a live payment."""
        ...

    async def get(self, payment_id: str, *, for_update: bool = False) -> Payment: ...

    async def save(self, before: Payment, after: Payment, events: Sequence[PaymentEvent]) -> None:
        """Write `after` if the row is still `before` (else ConcurrentModification)."""
        ...

    async def active_for_order(self, order_id: str) -> Payment | None: ...

    async def page(
        self, where: PaymentFilter, after: PageCursor | None, limit: int
    ) -> list[Payment]: ...

    async def events_after(
        self, payment_id: str, sequence: int, limit: int
    ) -> list[PaymentEvent]: ...

    async def authorized_before(self, created_before: datetime, limit: int) -> list[Payment]:
        """AUTHORIZED payments with nothing in flight, created before the cutoff."""
        ...

    async def stats(self, start: datetime, end: datetime) -> list[StatsGroup]:
        """Groups of the payments created in [start, end), by currency, status, method."""
        ...

    async def stale(self, updated_before: datetime, limit: int) -> list[Payment]:
        """Payments PROCESSING or holding an in-flight claim, last changed before the cutoff."""
        ...


class RefundRepository(Protocol):
    async def add(self, refund: Refund) -> None: ...

    async def save(self, refund: Refund, before: Refund | None = None) -> None:
        """Write `refund`; with `before`, only if the row still has `before`'s status
        (else ConcurrentModification)."""
        ...

    async def get(self, refund_id: str) -> Refund: ...

    async def page_for_payment(
        self, payment_id: str, after: PageCursor | None, limit: int
    ) -> list[Refund]: ...

    async def reserved_minor(self, payment_id: str) -> int:
        """Sum of the payment's refunds still PENDING at the gateway."""
        ...

    async def stale_pending(self, updated_before: datetime, limit: int) -> list[Refund]: ...


class UnitOfWork(Protocol):
    """One database transaction. Leaving the block without commit() rolls back. The unit
    of work collects the payment events its repositories write and, once the block is
    left after a commit, announces them on the status bus (service/changes.py)."""

    @property
    def payments(self) -> PaymentRepository: ...

    @property
    def refunds(self) -> RefundRepository: ...

    @property
    def idempotency(self) -> IdempotencyRepository: ...

    @property
    def gateway_events(self) -> GatewayEventRepository: ...

    async def commit(self) -> None: ...

    def publish_refusal(self, refusal: ChargeRefusal) -> None:
        """Write `refusal` to the outbox with this transaction (right before its COMMIT)."""
        ...

    def on_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once this transaction has committed (never after a rollback)."""
        ...


class UnitOfWorkFactory(Protocol):
    def __call__(self, *, read_only: bool = False) -> AbstractAsyncContextManager[UnitOfWork]: ...


# ---------------------------------------------------------------- idempotency


class Operation(enum.StrEnum):
    """What a keyed execution does: a key is scoped to (caller, operation, key), and the
    recovery worker finishes an abandoned key by what its operation was."""

    CHARGE = "CHARGE"
    CAPTURE = "CAPTURE"
    CANCEL = "CANCEL"
    REFUND = "REFUND"


class RecoveryPoint(enum.StrEnum):
    STARTED = "STARTED"
    PAYMENT_CREATED = "PAYMENT_CREATED"
    OPERATION_CLAIMED = "OPERATION_CLAIMED"
    REFUND_CREATED = "REFUND_CREATED"
    FINISHED = "FINISHED"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    record_id: str
    scope: str
    operation: Operation
    key: str
    fingerprint: str
    recovery_point: RecoveryPoint
    created_at: datetime
    expires_at: datetime
    payment_id: str | None = None
    refund_id: str | None = None
    locked_by: str | None = None
    locked_at: datetime | None = None
    response_code: int | None = None
    response_body: bytes | None = None


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """A finished execution: status code 0 with the response bytes, or an error status."""

    code: int
    body: bytes


class IdempotencyRepository(Protocol):
    async def insert_if_absent(self, record: KeyRecord) -> bool:
        """Insert; False if (scope, operation, key) exists already."""
        ...

    async def get_for_update(
        self, scope: str, operation: Operation, key: str
    ) -> KeyRecord | None: ...

    async def save(self, record: KeyRecord) -> None: ...

    async def advance(self, record: KeyRecord) -> None:
        """Save the record's progress (recovery point, payment and refund ids) only; the
        lock columns stay as they are (the holder renews them)."""
        ...

    async def renew(self, record_ids: Sequence[str], owner: str, now: datetime) -> int:
        """Set locked_at = now on those unfinished keys still locked by `owner`; the count."""
        ...

    async def delete(self, record_id: str) -> None: ...

    async def delete_expired(self, now: datetime, limit: int) -> int: ...

    async def release_locks_of(self, owner: str) -> int: ...

    async def abandoned(
        self, locked_before: datetime, now: datetime, limit: int
    ) -> list[KeyRecord]:
        """Unexpired, unfinished keys nobody holds: unlocked, or locked before the cutoff."""
        ...


class AnswerEncoder(Protocol):
    def __call__(self, operation: Operation, result: object) -> bytes:
        """The stored answer for a finished execution of `operation`: the response bytes
        the call would have sent for `result` (a Payment, or a (Refund, Payment) pair)."""
        ...


# ---------------------------------------------------------------- status bus


class Subscription(Protocol):
    async def wait(self, timeout_s: float | None = None) -> bool:
        """Return True once something was published for the payment since the last
        wait; False when `timeout_s` passed first."""
        ...


class StatusBus(Protocol):
    async def publish(self, payment_id: str, sequence: int) -> None: ...

    def subscribe(self, payment_id: str) -> AbstractAsyncContextManager[Subscription]: ...


class Clock(Protocol):
    def now(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller."""

    subject: str
    scopes: frozenset[str]
    expires_at: datetime
    customer_id: str | None = None


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Principal:
        """Raises Unauthenticated for any bad token, AuthUnavailable when it cannot tell."""
        ...


class Faults(Protocol):
    """Crash-test hook: `hit` may end the process at a named phase boundary."""

    def hit(self, point: str) -> None: ...


EventStream = AsyncIterator[PaymentEvent]
