"""The transactional outbox in SQL: rows written with the events in the same transaction
(`OutboxWriter`, called by the unit of work right before COMMIT), and the relay's side
(`SqlOutboxStore`: claim, delivered, failed; `list_rows` / `retry_parked` for the CLI).

Claims use FOR UPDATE SKIP LOCKED on PostgreSQL, so replicas never wait for each other;
on SQLite the claiming transaction is BEGIN IMMEDIATE (the single writer).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from payment_grpc.adapters.db.pipelining import write_behind
from payment_grpc.adapters.db.reading import without_writer_lock
from payment_grpc.adapters.db.tables import outbox
from payment_grpc.domain.payment import Payment, PaymentEvent
from payment_grpc.service.outbox import FAILED, REFUSAL_ROUTE, event_id
from payment_grpc.service.ports import ChargeRefusal, OutboxMessage

PENDING, DELIVERED, PARKED = "pending", "delivered", "parked"
# (payment as of the transaction, event, type) -> serialized payments.v1.PaymentEvent
EventEncoder = Callable[[Payment, PaymentEvent, str], bytes]
# a charge refused without a payment -> serialized payments.v1.PaymentEvent (no payment)
RefusalEncoder = Callable[[ChargeRefusal], bytes]
Route = tuple[str, Callable[[str], bool]]  # sink name, which event types it takes


@dataclass(frozen=True, slots=True)
class Recorded:
    """One event a transaction wrote, with its type and wire form (encoded once)."""

    payment: Payment
    event: PaymentEvent
    kind: str
    payload: bytes


# Written right before COMMIT, results unread: on PostgreSQL sent with it (pipelining.py).
_INSERT = write_behind(outbox.insert())


@dataclass(frozen=True, slots=True)
class OutboxWriter:
    routes: Sequence[Route]
    wake: Callable[[], None]  # the relay, after a commit that wrote rows

    async def write(
        self, conn: AsyncConnection, recorded: Sequence[Recorded], now: datetime
    ) -> bool:
        """Insert the rows for these events; whether any was written."""
        rows = [
            _row(sink, item, now)
            for item in recorded
            for sink, wants in self.routes
            if wants(item.kind)
        ]
        if rows:
            await conn.execute(_INSERT, rows)
        return bool(rows)

    async def write_refusals(
        self,
        conn: AsyncConnection,
        refusals: Sequence[tuple[ChargeRefusal, bytes]],
        now: datetime,
    ) -> bool:
        """Rows for charges refused without a payment (published as `payment.failed`), for
        the sinks that want REFUSAL_ROUTE; each its own group (its dedupe id stands for the
        payment id), sequence 0. Whether any was written."""
        rows = [
            {
                "sink": sink,
                "dedupe_id": refusal.event_id,
                "payment_id": refusal.event_id,
                "sequence": 0,
                "event_type": FAILED,
                "payload": payload,
                "state": PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for refusal, payload in refusals
            for sink, wants in self.routes
            if wants(REFUSAL_ROUTE)
        ]
        if rows:
            await conn.execute(_INSERT, rows)
        return bool(rows)


def _row(sink: str, item: Recorded, now: datetime) -> dict[str, Any]:
    return {
        "sink": sink,
        "dedupe_id": event_id(item.event, item.kind),
        "payment_id": item.event.payment_id,
        "sequence": item.event.sequence,
        "event_type": item.kind,
        "payload": item.payload,
        "state": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


_EARLIER = outbox.alias("earlier")
_UNDELIVERED_EARLIER = (
    sa.select(sa.literal(1))
    .where(
        _EARLIER.c.sink == outbox.c.sink,
        _EARLIER.c.payment_id == outbox.c.payment_id,
        _EARLIER.c.sequence < outbox.c.sequence,
        _EARLIER.c.state != DELIVERED,
    )
    .exists()
)
_MESSAGE_COLUMNS = (
    outbox.c.id,
    outbox.c.sink,
    outbox.c.dedupe_id,
    outbox.c.payment_id,
    outbox.c.sequence,
    outbox.c.event_type,
    outbox.c.payload,
    outbox.c.attempts,
)


def _utc(value: object) -> datetime | None:
    """An aggregate loses the column type: SQLite returns text, PostgreSQL a datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class SqlOutboxStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._row_locks = engine.dialect.name != "sqlite"

    async def claim(
        self,
        owner: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
        exclude: Collection[int] = (),
    ) -> list[OutboxMessage]:
        where = [
            outbox.c.state == PENDING,
            outbox.c.next_attempt_at <= now,
            sa.or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until < now),
            ~_UNDELIVERED_EARLIER,
        ]
        if exclude:
            where.append(outbox.c.id.not_in(list(exclude)))
        query = sa.select(*_MESSAGE_COLUMNS).where(*where).order_by(outbox.c.id).limit(limit)
        if self._row_locks:
            query = query.with_for_update(skip_locked=True, of=outbox)
        async with self._engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            if rows:
                await conn.execute(
                    outbox.update()
                    .where(outbox.c.id.in_([row.id for row in rows]))
                    .values(claimed_by=owner, claimed_until=lease_until)
                )
        return [OutboxMessage(row[0], *row[1:]) for row in rows]

    async def delivered(self, message: OutboxMessage, now: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                outbox.update()
                .where(outbox.c.id == message.row_id, outbox.c.state == PENDING)
                .values(state=DELIVERED, delivered_at=now, claimed_by=None, claimed_until=None)
            )

    async def failed(
        self, message: OutboxMessage, owner: str, error: str, retry_at: datetime | None
    ) -> None:
        values: dict[str, Any] = {
            "attempts": message.attempts + 1,
            "last_error": error,
            "claimed_by": None,
            "claimed_until": None,
        }
        if retry_at is None:
            values["state"] = PARKED
        else:
            values["next_attempt_at"] = retry_at
        async with self._engine.begin() as conn:
            await conn.execute(
                outbox.update()
                .where(
                    outbox.c.id == message.row_id,
                    outbox.c.state == PENDING,
                    outbox.c.claimed_by == owner,
                )
                .values(**values)
            )

    async def next_due(self) -> datetime | None:
        """When a claim could next find something: the earliest pending row that no earlier
        undelivered row holds back, once its backoff and any other replica's lease end."""
        available_at = sa.case(
            (outbox.c.claimed_until > outbox.c.next_attempt_at, outbox.c.claimed_until),
            else_=outbox.c.next_attempt_at,
        )
        query = sa.select(sa.func.min(available_at)).where(
            outbox.c.state == PENDING, ~_UNDELIVERED_EARLIER
        )
        async with self._engine.connect() as conn:
            conn = await without_writer_lock(conn)
            due = (await conn.execute(query)).scalar_one()
        return _utc(due)

    async def backlog(self) -> dict[str, tuple[datetime | None, int]]:
        query = (
            sa.select(
                outbox.c.sink,
                sa.func.min(sa.case((outbox.c.state == PENDING, outbox.c.created_at))),
                sa.func.count().filter(outbox.c.state == PARKED),
            )
            .where(outbox.c.state != DELIVERED)
            .group_by(outbox.c.sink)
        )
        async with self._engine.connect() as conn:
            conn = await without_writer_lock(conn)
            rows = (await conn.execute(query)).all()
        return {sink: (_utc(oldest), parked) for sink, oldest, parked in rows}

    async def list_rows(self, states: Sequence[str], limit: int) -> list[Any]:
        query = (
            sa.select(
                outbox.c.id,
                outbox.c.sink,
                outbox.c.dedupe_id,
                outbox.c.event_type,
                outbox.c.state,
                outbox.c.attempts,
                outbox.c.next_attempt_at,
                outbox.c.last_error,
            )
            .where(outbox.c.state.in_(states))
            .order_by(outbox.c.id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def retry_parked(self, ids: Sequence[int], now: datetime) -> int:
        """Give parked rows (these, or all when empty) a fresh set of attempts."""
        where = [outbox.c.state == PARKED]
        if ids:
            where.append(outbox.c.id.in_(ids))
        async with self._engine.begin() as conn:
            result = await conn.execute(
                outbox.update()
                .where(*where)
                .values(state=PENDING, attempts=0, next_attempt_at=now, last_error=None)
            )
        return result.rowcount
