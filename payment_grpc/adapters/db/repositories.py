"""SQLAlchemy Core repositories: one statement per call, no ORM flushes on the hot path."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.adapters.db.crypto import FieldCipher
from payment_grpc.adapters.db.pipelining import write_behind
from payment_grpc.adapters.db.reading import DirectRow
from payment_grpc.adapters.db.rows import (
    event_to_row,
    payment_changes,
    payment_to_row,
    refund_to_row,
    row_to_event,
    row_to_payment,
    row_to_refund,
)
from payment_grpc.adapters.db.tables import payment_events, payments, refunds
from payment_grpc.adapters.db.writing import DirectConnection, DirectWrite
from payment_grpc.domain.errors import ActivePaymentExists, PaymentNotFound, RefundNotFound
from payment_grpc.domain.payment import (
    INACTIVE_STATUSES,
    Payment,
    PaymentEvent,
    PaymentMethodType,
    PaymentStatus,
)
from payment_grpc.domain.refund import Refund, RefundStatus
from payment_grpc.service.errors import ConcurrentModification
from payment_grpc.service.ports import PageCursor, PaymentFilter, StatsGroup

_INACTIVE = [s.value for s in INACTIVE_STATUSES]

# Hot-path statements are built once and executed with parameters: building one per call
# (`.values(row)`, `== value`) cost more CPU than the round trip to the database.
# Bind names start with `b_` so they never clash with the column names being SET.
# A new payment whose order already has an active one (the partial unique index) is not
# inserted: no row comes back, instead of an error that would need a SAVEPOINT around it.
# The hot writes are DirectWrites: on PostgreSQL past SQLAlchemy's layers (writing.py).
_INSERT_PAYMENT = {
    name: DirectWrite(dialect.insert(payments).on_conflict_do_nothing().returning(payments.c.id))
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_SELECT_PAYMENT = sa.select(payments).where(payments.c.id == sa.bindparam("b_id"))
_LOCK_PAYMENT = _SELECT_PAYMENT.with_for_update()
_READ_PAYMENT = DirectRow(_SELECT_PAYMENT)  # read-only, PostgreSQL, no statement spans
# Only if the row is still the version the change was decided on (changes.py's Snapshot:
# sequence, status, claim, reference), so a change can be written without reading first.
_UPDATE_PAYMENT = DirectWrite(
    payments.update().where(
        payments.c.id == sa.bindparam("b_id"),
        payments.c.sequence == sa.bindparam("b_sequence"),
        payments.c.status == sa.bindparam("b_status"),
        payments.c.in_flight == sa.bindparam("b_in_flight"),
        payments.c.gateway_reference == sa.bindparam("b_gateway_reference"),
    )
)
# Nobody reads these statements' results: on PostgreSQL they go out with the next statement
# that needs an answer, or with the COMMIT (pipelining.py).
_INSERT_EVENT = write_behind(payment_events.insert())
_INSERT_REFUND = write_behind(refunds.insert())
_REFUND_BY_ID = refunds.update().where(refunds.c.id == sa.bindparam("b_id"))
_UPDATE_REFUND = write_behind(_REFUND_BY_ID)
# Only if the refund still has the status the change was decided on: sent at once, its
# row count read (the versioned counterpart of _UPDATE_PAYMENT).
_UPDATE_REFUND_IF = _REFUND_BY_ID.where(refunds.c.status == sa.bindparam("b_status"))
_SELECT_REFUND = sa.select(refunds).where(refunds.c.id == sa.bindparam("b_id"))


Written = list[tuple[Payment, Sequence[PaymentEvent]]]


class SqlPaymentRepository:
    def __init__(
        self,
        conn: AsyncConnection,
        row_locks: bool,
        cipher: FieldCipher,
        written: list[PaymentEvent] | None = None,
        changed: Written | None = None,
        direct_reads: bool = False,
        events_with_commit: bool = False,
        direct: DirectConnection | None = None,
    ) -> None:
        """`written` collects the events this repository writes (its unit of work's);
        `changed` the same as (payment, its events), for the feed and the outbox;
        `direct_reads`: `get` reads through psycopg directly (read-only on PostgreSQL,
        untraced: SqlUnitOfWorkFactory decides); `events_with_commit`: the payment_events
        rows of `changed` are written by the unit of work's commit (event_log.py, on
        PostgreSQL), not here; `direct`: the hot writes go through psycopg on it
        (writing.py)."""
        self._conn = conn
        self._direct = direct
        self._events_with_commit = events_with_commit
        self._direct_reads = direct_reads
        self._row_locks = row_locks
        self._cipher = cipher
        self._written = [] if written is None else written
        # (payment, its events) written in this transaction: counted once it commits.
        self.changed: Written = [] if changed is None else changed

    async def add(self, payment: Payment, events: Sequence[PaymentEvent]) -> None:
        insert = _INSERT_PAYMENT[self._conn.dialect.name]
        row = payment_to_row(payment, self._cipher)
        if await insert.first(self._conn, self._direct, row) is None:
            existing = await self.active_for_order(payment.order_id)
            if existing is None:  # the other one became inactive meanwhile: decide again
                raise ConcurrentModification(f"order {payment.order_id} changed concurrently")
            raise ActivePaymentExists(payment.order_id, existing.payment_id)
        await self._insert_events(events)
        self.changed.append((payment, events))

    async def get(self, payment_id: str, *, for_update: bool = False) -> Payment:
        if self._direct_reads and not for_update:
            found = await _READ_PAYMENT.first(self._conn, {"b_id": payment_id})
            if found is None:
                raise PaymentNotFound(payment_id)
            return row_to_payment(found, self._cipher)
        query = _LOCK_PAYMENT if for_update and self._row_locks else _SELECT_PAYMENT
        row = (await self._conn.execute(query, {"b_id": payment_id})).mappings().first()
        if row is None:
            raise PaymentNotFound(payment_id)
        return row_to_payment(row, self._cipher)

    async def save(self, before: Payment, after: Payment, events: Sequence[PaymentEvent]) -> None:
        changed = await _UPDATE_PAYMENT.rowcount(
            self._conn,
            self._direct,
            {
                **payment_changes(before, after, self._cipher),
                "b_id": before.payment_id,
                "b_sequence": before.sequence,
                "b_status": before.status.value,
                "b_in_flight": before.in_flight,
                "b_gateway_reference": before.gateway_reference,
            },
        )
        if changed != 1:
            raise ConcurrentModification(f"payment {before.payment_id} changed concurrently")
        await self._insert_events(events)
        self.changed.append((after, events))

    async def _insert_events(self, events: Sequence[PaymentEvent]) -> None:
        if events:
            if not self._events_with_commit:
                await self._conn.execute(_INSERT_EVENT, [event_to_row(e) for e in events])
            self._written.extend(events)

    async def active_for_order(self, order_id: str) -> Payment | None:
        query = sa.select(payments).where(
            payments.c.order_id == order_id, payments.c.status.not_in(_INACTIVE)
        )
        row = (await self._conn.execute(query)).mappings().first()
        return row_to_payment(row, self._cipher) if row else None

    async def page(
        self, where: PaymentFilter, after: PageCursor | None, limit: int
    ) -> list[Payment]:
        query = sa.select(payments)
        if where.order_id:
            query = query.where(payments.c.order_id == where.order_id)
        if where.customer_id:
            query = query.where(payments.c.customer_id == where.customer_id)
        if where.status is not None:
            query = query.where(payments.c.status == where.status.value)
        if after is not None:
            query = query.where(
                sa.tuple_(payments.c.created_at, payments.c.id)
                < sa.tuple_(sa.literal(after.created_at, payments.c.created_at.type), after.last_id)
            )
        query = query.order_by(payments.c.created_at.desc(), payments.c.id.desc()).limit(limit)
        rows = (await self._conn.execute(query)).mappings().all()
        return [row_to_payment(r, self._cipher) for r in rows]

    async def events_after(self, payment_id: str, sequence: int, limit: int) -> list[PaymentEvent]:
        query = (
            sa.select(payment_events)
            .where(payment_events.c.payment_id == payment_id, payment_events.c.sequence > sequence)
            .order_by(payment_events.c.sequence)
            .limit(limit)
        )
        rows = (await self._conn.execute(query)).mappings().all()
        return [row_to_event(r) for r in rows]

    async def authorized_before(self, created_before: datetime, limit: int) -> list[Payment]:
        query = (
            sa.select(payments)
            .where(
                payments.c.status == PaymentStatus.AUTHORIZED.value,
                payments.c.in_flight == "",
                payments.c.created_at < created_before,
            )
            .order_by(payments.c.created_at)
            .limit(limit)
        )
        rows = (await self._conn.execute(query)).mappings().all()
        return [row_to_payment(r, self._cipher) for r in rows]

    async def stats(self, start: datetime, end: datetime) -> list[StatsGroup]:
        groups = (payments.c.currency, payments.c.status, payments.c.method_type)
        query = (
            sa.select(
                *groups,
                sa.func.count(),
                sa.func.sum(payments.c.amount_minor),
                sa.func.sum(payments.c.captured_minor),
                sa.func.sum(payments.c.refunded_minor),
            )
            .where(payments.c.created_at >= start, payments.c.created_at < end)
            .group_by(*groups)
            .order_by(*groups)
        )
        return [
            StatsGroup(
                status=PaymentStatus(status),
                method_type=PaymentMethodType(method_type),
                currency=currency,
                payment_count=int(count),
                amount_minor=int(amount),  # PostgreSQL sums bigint as numeric
                captured_minor=int(captured),
                refunded_minor=int(refunded),
            )
            for currency, status, method_type, count, amount, captured, refunded in (
                await self._conn.execute(query)
            )
        ]

    async def stale(self, updated_before: datetime, limit: int) -> list[Payment]:
        query = (
            sa.select(payments)
            .where(
                sa.or_(
                    payments.c.status == PaymentStatus.PROCESSING.value,
                    payments.c.in_flight != "",
                ),
                payments.c.updated_at < updated_before,
            )
            .order_by(payments.c.updated_at)
            .limit(limit)
        )
        rows = (await self._conn.execute(query)).mappings().all()
        return [row_to_payment(r, self._cipher) for r in rows]


class SqlRefundRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self.changed: list[Refund] = []  # counted once the transaction commits

    async def add(self, refund: Refund) -> None:
        await self._conn.execute(_INSERT_REFUND, refund_to_row(refund))
        self.changed.append(refund)

    async def save(self, refund: Refund, before: Refund | None = None) -> None:
        row = {**refund_to_row(refund), "b_id": refund.refund_id}
        if before is None:
            await self._conn.execute(_UPDATE_REFUND, row)
        else:
            versioned = {**row, "b_status": before.status.value}
            if (await self._conn.execute(_UPDATE_REFUND_IF, versioned)).rowcount != 1:
                raise ConcurrentModification(f"refund {refund.refund_id} changed concurrently")
        self.changed.append(refund)

    async def get(self, refund_id: str) -> Refund:
        row = (await self._conn.execute(_SELECT_REFUND, {"b_id": refund_id})).mappings().first()
        if row is None:
            raise RefundNotFound(refund_id)
        return row_to_refund(row)

    async def page_for_payment(
        self, payment_id: str, after: PageCursor | None, limit: int
    ) -> list[Refund]:
        query = sa.select(refunds).where(refunds.c.payment_id == payment_id)
        if after is not None:
            query = query.where(
                sa.tuple_(refunds.c.created_at, refunds.c.id)
                > sa.tuple_(sa.literal(after.created_at, refunds.c.created_at.type), after.last_id)
            )
        query = query.order_by(refunds.c.created_at, refunds.c.id).limit(limit)
        rows = (await self._conn.execute(query)).mappings().all()
        return [row_to_refund(r) for r in rows]

    async def reserved_minor(self, payment_id: str) -> int:
        query = sa.select(sa.func.coalesce(sa.func.sum(refunds.c.amount_minor), 0)).where(
            refunds.c.payment_id == payment_id, refunds.c.status == RefundStatus.PENDING.value
        )
        return int((await self._conn.execute(query)).scalar_one())

    async def stale_pending(self, updated_before: datetime, limit: int) -> list[Refund]:
        query = (
            sa.select(refunds)
            .where(
                refunds.c.status == RefundStatus.PENDING.value,
                refunds.c.updated_at < updated_before,
            )
            .order_by(refunds.c.updated_at)
            .limit(limit)
        )
        rows = (await self._conn.execute(query)).mappings().all()
        return [row_to_refund(r) for r in rows]
