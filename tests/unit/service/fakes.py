"""Real in-memory implementations of the service ports, for fast use-case tests without
gRPC or a database. They keep the ports' promises (what the SQL adapters do): a unit of
work sees its own writes, commits all or nothing, serializes writers like SQLite's
writer lock, rejects a stale save, announces its events only after the commit; the
gateway dedupes on our key like a real PSP."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from payment_grpc.domain.errors import ActivePaymentExists, PaymentNotFound, RefundNotFound
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import INACTIVE_STATUSES, Failure, Payment, PaymentEvent
from payment_grpc.domain.payment import PaymentStatus as S
from payment_grpc.domain.refund import Refund, RefundStatus
from payment_grpc.service.errors import ConcurrentModification, StorageUnavailable
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationOutcome,
    AuthorizationRequest,
    ChargeRefusal,
    GatewayResult,
    GatewayTimeout,
    GatewayUnreachable,
    KeyRecord,
    Operation,
    PageCursor,
    PaymentFilter,
    RecoveryPoint,
    StatusBus,
)

# ---------------------------------------------------------------- clock, faults, bus


class ManualClock:
    def __init__(self, start: datetime = datetime(2026, 12, 1, tzinfo=UTC)) -> None:
        self.current = start

    def now(self) -> datetime:
        return self.current

    def advance(self, by: timedelta) -> None:
        self.current += by


class Crash(BaseException):
    """The process died here (BaseException: nothing in the service catches it)."""


class CrashAt:
    """Faults port: the first time execution reaches `point`, the 'process' dies."""

    def __init__(self, point: str = "") -> None:
        self.point = point

    def hit(self, point: str) -> None:
        if point == self.point:
            self.point = ""  # the restarted process runs without the fault
            raise Crash(point)


class _Wakeups:
    async def wait(self, timeout_s: float | None = None) -> bool:
        """Never woken: quiet until `timeout_s` (or for ever)."""
        if timeout_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(timeout_s or 0)
        return False


class RecordingBus:
    """StatusBus that remembers what was announced, in order."""

    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []

    async def publish(self, payment_id: str, sequence: int) -> None:
        self.published.append((payment_id, sequence))

    @asynccontextmanager
    async def subscribe(self, payment_id: str) -> AsyncIterator[_Wakeups]:
        yield _Wakeups()


# ---------------------------------------------------------------- storage


@dataclass
class Tables:
    payments: dict[str, Payment] = field(default_factory=dict)
    events: dict[str, list[PaymentEvent]] = field(default_factory=dict)
    refunds: dict[str, Refund] = field(default_factory=dict)
    keys: dict[str, KeyRecord] = field(default_factory=dict)

    def copy(self) -> Tables:
        return Tables(
            dict(self.payments),
            {pid: list(events) for pid, events in self.events.items()},
            dict(self.refunds),
            dict(self.keys),
        )


class MemoryPayments:
    def __init__(self, tables: Tables, written: list[PaymentEvent]) -> None:
        self._t = tables
        self._written = written

    async def add(self, payment: Payment, events: Sequence[PaymentEvent]) -> None:
        existing = await self.active_for_order(payment.order_id)
        if existing is not None:
            raise ActivePaymentExists(payment.order_id, existing.payment_id)
        self._t.payments[payment.payment_id] = payment
        self._append(events)

    async def get(self, payment_id: str, *, for_update: bool = False) -> Payment:
        if payment_id not in self._t.payments:
            raise PaymentNotFound(payment_id)
        return self._t.payments[payment_id]

    async def save(self, before: Payment, after: Payment, events: Sequence[PaymentEvent]) -> None:
        stored = self._t.payments.get(before.payment_id)
        if stored is None or _version(stored) != _version(before):
            raise ConcurrentModification(f"payment {before.payment_id} changed concurrently")
        self._t.payments[after.payment_id] = after
        self._append(events)

    def _append(self, events: Sequence[PaymentEvent]) -> None:
        for event in events:
            history = self._t.events.setdefault(event.payment_id, [])
            assert event.sequence == len(history) + 1, "events must be gap-free"
            history.append(event)
        self._written.extend(events)

    async def active_for_order(self, order_id: str) -> Payment | None:
        return next(
            (
                p
                for p in self._t.payments.values()
                if p.order_id == order_id and p.status not in INACTIVE_STATUSES
            ),
            None,
        )

    async def page(
        self, where: PaymentFilter, after: PageCursor | None, limit: int
    ) -> list[Payment]:
        rows = [
            p
            for p in self._t.payments.values()
            if (not where.order_id or p.order_id == where.order_id)
            and (not where.customer_id or p.customer_id == where.customer_id)
            and (where.status is None or p.status is where.status)
            and (after is None or (p.created_at, p.payment_id) < (after.created_at, after.last_id))
        ]
        rows.sort(key=lambda p: (p.created_at, p.payment_id), reverse=True)
        return rows[:limit]

    async def events_after(self, payment_id: str, sequence: int, limit: int) -> list[PaymentEvent]:
        return [e for e in self._t.events.get(payment_id, []) if e.sequence > sequence][:limit]

    async def stale(self, updated_before: datetime, limit: int) -> list[Payment]:
        rows = [
            p
            for p in self._t.payments.values()
            if (p.status is S.PROCESSING or p.in_flight) and p.updated_at < updated_before
        ]
        return sorted(rows, key=lambda p: p.updated_at)[:limit]


class MemoryRefunds:
    def __init__(self, tables: Tables) -> None:
        self._t = tables

    async def add(self, refund: Refund) -> None:
        self._t.refunds[refund.refund_id] = refund

    async def save(self, refund: Refund, before: Refund | None = None) -> None:
        stored = self._t.refunds.get(refund.refund_id)
        if before is not None and (stored is None or stored.status is not before.status):
            raise ConcurrentModification(f"refund {refund.refund_id} changed concurrently")
        self._t.refunds[refund.refund_id] = refund

    async def get(self, refund_id: str) -> Refund:
        if refund_id not in self._t.refunds:
            raise RefundNotFound(refund_id)
        return self._t.refunds[refund_id]

    async def page_for_payment(
        self, payment_id: str, after: PageCursor | None, limit: int
    ) -> list[Refund]:
        rows = [
            r
            for r in self._t.refunds.values()
            if r.payment_id == payment_id
            and (after is None or (r.created_at, r.refund_id) > (after.created_at, after.last_id))
        ]
        return sorted(rows, key=lambda r: (r.created_at, r.refund_id))[:limit]

    async def reserved_minor(self, payment_id: str) -> int:
        return sum(
            r.amount.amount_minor
            for r in self._t.refunds.values()
            if r.payment_id == payment_id and r.status is RefundStatus.PENDING
        )

    async def stale_pending(self, updated_before: datetime, limit: int) -> list[Refund]:
        rows = [
            r
            for r in self._t.refunds.values()
            if r.status is RefundStatus.PENDING and r.updated_at < updated_before
        ]
        return sorted(rows, key=lambda r: r.updated_at)[:limit]


class MemoryKeys:
    def __init__(self, tables: Tables) -> None:
        self._t = tables

    def _find(self, scope: str, operation: Operation, key: str) -> KeyRecord | None:
        return next(
            (
                r
                for r in self._t.keys.values()
                if (r.scope, r.operation, r.key) == (scope, operation, key)
            ),
            None,
        )

    async def insert_if_absent(self, record: KeyRecord) -> bool:
        if self._find(record.scope, record.operation, record.key) is not None:
            return False
        self._t.keys[record.record_id] = record
        return True

    async def get_for_update(self, scope: str, operation: Operation, key: str) -> KeyRecord | None:
        return self._find(scope, operation, key)

    async def save(self, record: KeyRecord) -> None:
        if record.record_id in self._t.keys:
            self._t.keys[record.record_id] = record

    async def advance(self, record: KeyRecord) -> None:
        if (current := self._t.keys.get(record.record_id)) is not None:
            self._t.keys[record.record_id] = replace(
                current,
                recovery_point=record.recovery_point,
                payment_id=record.payment_id,
                refund_id=record.refund_id,
            )

    async def renew(self, record_ids: Sequence[str], owner: str, now: datetime) -> int:
        renewed = 0
        for record_id in record_ids:
            record = self._t.keys.get(record_id)
            if (
                record is not None
                and record.locked_by == owner
                and record.recovery_point is not RecoveryPoint.FINISHED
            ):
                self._t.keys[record_id] = replace(record, locked_at=now)
                renewed += 1
        return renewed

    async def delete(self, record_id: str) -> None:
        self._t.keys.pop(record_id, None)

    async def delete_expired(self, now: datetime, limit: int) -> int:
        expired = [r.record_id for r in self._t.keys.values() if r.expires_at <= now][:limit]
        for record_id in expired:
            del self._t.keys[record_id]
        return len(expired)

    async def release_locks_of(self, owner: str) -> int:
        held = [r for r in self._t.keys.values() if r.locked_by == owner]
        for record in held:
            self._t.keys[record.record_id] = replace(record, locked_by=None, locked_at=None)
        return len(held)

    async def abandoned(
        self, locked_before: datetime, now: datetime, limit: int
    ) -> list[KeyRecord]:
        rows = [
            r
            for r in self._t.keys.values()
            if r.recovery_point is not RecoveryPoint.FINISHED
            and (r.locked_at is None or r.locked_at <= locked_before)
            and r.expires_at > now
        ]
        return sorted(rows, key=lambda r: r.created_at)[:limit]


class MemoryUnitOfWork:
    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.events: list[PaymentEvent] = []
        self.committed = False
        self._on_commit: list[Callable[[], None]] = []
        self.payments = MemoryPayments(tables, self.events)
        self.refunds = MemoryRefunds(tables)
        self.idempotency = MemoryKeys(tables)
        self.refusals: list[ChargeRefusal] = []  # the outbox's refusals, in this transaction

    def on_commit(self, action: Callable[[], None]) -> None:
        self._on_commit.append(action)

    def publish_refusal(self, refusal: ChargeRefusal) -> None:
        self.refusals.append(refusal)

    async def commit(self) -> None:
        self.committed = True
        for action in self._on_commit:
            action()


class MemoryDatabase:
    """UnitOfWorkFactory over one in-memory state. Writing transactions run one at a
    time (SQLite's writer lock); `writing` tells whether one holds that lock now. While
    `busy` is set, writing transactions fail as a busy database's do, and `refused` is
    set once one has."""

    def __init__(self, bus: StatusBus | None = None) -> None:
        self.tables = Tables()
        self.bus = bus
        self.transactions = 0
        self._writer = asyncio.Lock()
        self.busy = False
        self.refused = asyncio.Event()

    @property
    def writing(self) -> bool:
        return self._writer.locked()

    @asynccontextmanager
    async def __call__(self, *, read_only: bool = False) -> AsyncIterator[MemoryUnitOfWork]:
        self.transactions += 1
        if read_only:
            yield MemoryUnitOfWork(self.tables.copy())
            return
        if self.busy:
            self.refused.set()
            raise StorageUnavailable("the database is unavailable")
        tx: MemoryUnitOfWork | None = None
        crashed = False  # a crash ends the process: nothing after it is announced
        try:
            async with self._writer:
                tx = MemoryUnitOfWork(self.tables.copy())
                try:
                    yield tx
                except Crash:
                    crashed = True
                    raise
                finally:
                    if tx.committed:
                        self.tables = tx.tables
        finally:
            if tx is not None and tx.committed and not crashed and self.bus is not None:
                for event in tx.events:
                    await self.bus.publish(event.payment_id, event.sequence)


# ---------------------------------------------------------------- gateway


APPROVED = "tok_visa"
DECLINED = "tok_chargeDeclined"
LOST = "tok_lost"  # the gateway decides, but its answer never arrives
DOWN = "tok_down"  # the gateway cannot be reached: nothing is sent
DECLINE = Failure("card_declined", "Your card was declined.", "generic_decline")


class FakeGateway:
    """PaymentGateway with fixed outcomes per token, deduping every call on our key."""

    def __init__(self) -> None:
        self.authorizations: dict[str, Authorization] = {}
        self.follow_ups: dict[str, tuple[str, GatewayResult]] = {}
        self.refuse_next: set[str] = set()  # "capture" / "void" / "refund": refused once
        self.unreachable = False  # every follow-up call fails before it is sent
        self._ids = itertools.count(1)

    async def authorize(self, request: AuthorizationRequest) -> Authorization:
        token = request.method.token
        if token == DOWN:
            raise GatewayUnreachable("connection refused")
        known = self.authorizations.get(request.idempotency_key)
        if known is None:
            known = self.authorizations[request.idempotency_key] = self._decide(request)
        if token == LOST:
            raise GatewayTimeout("the response was lost")
        return known

    def _decide(self, request: AuthorizationRequest) -> Authorization:
        reference = f"ch_{next(self._ids)}"
        if request.method.token == DECLINED:
            return Authorization(AuthorizationOutcome.DECLINED, reference, failure=DECLINE)
        outcome = (
            AuthorizationOutcome.CAPTURED if request.capture else AuthorizationOutcome.AUTHORIZED
        )
        return Authorization(outcome, reference)

    async def lookup(self, idempotency_key: str) -> Authorization | None:
        return self.authorizations.get(idempotency_key)

    async def capture(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return self._follow_up("capture", idempotency_key)

    async def void(self, reference: str, idempotency_key: str) -> GatewayResult:
        return self._follow_up("void", idempotency_key)

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return self._follow_up("refund", idempotency_key)

    def _follow_up(self, kind: str, key: str) -> GatewayResult:
        if self.unreachable:
            raise GatewayUnreachable("connection refused")
        if key not in self.follow_ups:
            if kind in self.refuse_next:
                self.refuse_next.discard(kind)
                result = GatewayResult(False, failure=Failure(f"{kind}_refused", ""))
            else:
                result = GatewayResult(True, reference=f"{kind}_{next(self._ids)}")
            self.follow_ups[key] = (kind, result)
        return self.follow_ups[key][1]

    def calls(self, kind: str) -> int:
        return sum(1 for k, _ in self.follow_ups.values() if k == kind)

    def available(self) -> bool:
        return True

    async def healthy(self) -> bool:
        return True


def _version(payment: Payment) -> tuple[object, ...]:
    """What the SQL UPDATE's condition compares (adapters/db/repositories.py)."""
    return payment.sequence, payment.status, payment.in_flight, payment.gateway_reference
