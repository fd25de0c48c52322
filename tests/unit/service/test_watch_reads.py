"""WatchPaymentStatus's fan-out: the watchers of one payment woken by one change share one
read of its events, and each still gets every event once, in order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from payment_grpc.adapters.bus.memory import InProcessStatusBus
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import CaptureMethod, PaymentEvent, PaymentMethod
from payment_grpc.domain.payment import PaymentMethodType as T
from payment_grpc.domain.payment import PaymentStatus as S
from payment_grpc.service.charging import ChargeCommand, Charging
from payment_grpc.service.context import RequestContext
from payment_grpc.service.deps import Deps, Records
from payment_grpc.service.event_reads import SharedEventReads
from payment_grpc.service.operations import Operations
from payment_grpc.service.ports import Subscription, UnitOfWork
from payment_grpc.service.queries import Queries
from payment_grpc.service.settlements import Settlements
from tests.unit.service.fakes import APPROVED, CrashAt, FakeGateway, ManualClock, MemoryDatabase

CALLER = RequestContext(subject="svc-orders")
WATCHERS = 50


class CountedReads:
    """The database, counting the read-only transactions (a watcher's read is one)."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db
        self.reads = 0

    def __call__(self, *, read_only: bool = False) -> AbstractAsyncContextManager[UnitOfWork]:
        self.reads += read_only
        return self.db(read_only=read_only)  # type: ignore[return-value]


class _Parked:
    def __init__(self, subscription: Subscription, bus: ParkingBus) -> None:
        self._subscription, self._bus = subscription, bus

    async def wait(self, timeout_s: float | None = None) -> bool:
        self._bus.parked += 1
        if self._bus.parked == WATCHERS:
            self._bus.all_parked.set()
        try:
            return await self._subscription.wait(timeout_s)
        finally:
            self._bus.parked -= 1


class ParkingBus:
    """The in-process bus, telling when every watcher is waiting for a wake-up."""

    def __init__(self) -> None:
        self._bus = InProcessStatusBus()
        self.parked = 0
        self.all_parked = asyncio.Event()
        self.published: list[int] = []

    async def publish(self, payment_id: str, sequence: int) -> None:
        self.published.append(sequence)
        await self._bus.publish(payment_id, sequence)

    @asynccontextmanager
    async def subscribe(self, payment_id: str) -> AsyncIterator[Subscription]:
        async with self._bus.subscribe(payment_id) as subscription:
            yield _Parked(subscription, self)


def _manual() -> ChargeCommand:
    return ChargeCommand(
        order_id=f"ord_{uuid.uuid4().hex}",
        amount=Money("USD", 1000),
        method=PaymentMethod(T.CARD, token=APPROVED),
        capture_method=CaptureMethod.MANUAL,
    )


async def _rest(stream: AsyncIterator[PaymentEvent]) -> list[PaymentEvent]:
    return [event async for event in stream]


async def test_watchers_of_one_payment_woken_by_one_change_share_one_read() -> None:
    bus = ParkingBus()
    db = CountedReads(MemoryDatabase(bus))
    records = Records(uow=db, bus=bus, clock=ManualClock(), faults=CrashAt())
    deps = Deps(uow=db, bus=bus, clock=records.clock, faults=records.faults, gateway=FakeGateway())
    operations, queries = Operations(deps), Queries(deps)
    payment = await Charging(deps, Settlements(records)).charge(_manual(), CALLER)
    assert payment.status is S.AUTHORIZED

    streams = [queries.watch(payment.payment_id, 0, False, CALLER) for _ in range(WATCHERS)]
    snapshots = [await anext(stream) for stream in streams]  # each checks access on its own
    assert {e.sequence for e in snapshots} == {payment.sequence}
    watchers = [asyncio.create_task(_rest(stream)) for stream in streams]
    await bus.all_parked.wait()
    reads, published = db.reads, len(bus.published)

    captured = await operations.capture(payment.payment_id, None, CALLER)
    assert captured.status is S.CAPTURED
    delivered = await asyncio.gather(*watchers)

    wakes = len(bus.published) - published
    assert (wakes, db.reads - reads) == (1, 1)  # one read for the change, not one per watcher
    async with db.db(read_only=True) as tx:
        expected = await tx.payments.events_after(payment.payment_id, payment.sequence, 100)
    assert [e.status for e in expected][-1:] == [S.CAPTURED]
    assert all(events == expected for events in delivered)  # every event once, in order


class HeldReads:
    """The database, holding each read-only transaction after it began (its snapshot is
    taken) until `release` is set."""

    def __init__(self, db: MemoryDatabase) -> None:
        self.db = db
        self.began = asyncio.Event()
        self.release = asyncio.Event()

    @asynccontextmanager
    async def __call__(self, *, read_only: bool = False) -> AsyncIterator[UnitOfWork]:
        async with self.db(read_only=read_only) as tx:
            if read_only:
                self.began.set()
                await self.release.wait()
            yield tx  # type: ignore[misc]


async def test_a_read_that_began_before_a_change_is_not_shared_with_a_watcher_woken_after() -> None:
    """Joining it would hand that watcher a result without the change that woke it, and
    the watcher would wait for a wake-up it already consumed."""
    held = HeldReads(MemoryDatabase(InProcessStatusBus()))
    records = Records(uow=held.db, bus=InProcessStatusBus(), clock=ManualClock(), faults=CrashAt())
    deps = Deps(
        uow=held.db,
        bus=records.bus,
        clock=records.clock,
        faults=records.faults,
        gateway=FakeGateway(),
    )
    payment = await Charging(deps, Settlements(records)).charge(_manual(), CALLER)
    reads = SharedEventReads(held)
    early = asyncio.create_task(reads.after(payment.payment_id, payment.sequence, 100))
    await held.began.wait()
    await Operations(deps).capture(payment.payment_id, None, CALLER)
    late = asyncio.create_task(reads.after(payment.payment_id, payment.sequence, 100))
    held.release.set()
    assert await early == []
    assert [e.status for e in await late][-1] is S.CAPTURED
