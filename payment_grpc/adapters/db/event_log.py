"""What a transaction's payment events imply, written in that transaction right before
COMMIT (called by the unit of work): the change feed rows (every event) and the outbox
rows (per sink). Each event is encoded once.

The feed rows take their place in the feed, (tx, position), from the database's defaults
(tables.py): no counter and no lock, so event-writing transactions commit side by side.
On PostgreSQL the feed rows go out with the COMMIT, in one round trip (pipelining.py), in
one statement with the payment_events rows themselves (the unit of work's repository
leaves those to the log there): one statement per transaction instead of one per event
and one for the feed (issue 12: psycopg's and SQLAlchemy's work per statement was the
largest share of a Charge's CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeDecorator

from payment_grpc.adapters.db.outbox import EventEncoder, OutboxWriter, Recorded, RefusalEncoder
from payment_grpc.adapters.db.pipelining import PipelinedConnection
from payment_grpc.adapters.db.rows import event_to_row
from payment_grpc.adapters.db.tables import payment_events, payment_feed
from payment_grpc.domain.payment import Payment, PaymentEvent
from payment_grpc.service.outbox import event_type, event_types
from payment_grpc.service.ports import ChargeRefusal


@dataclass(frozen=True, slots=True)
class EventLog:
    encode: EventEncoder
    outbox: OutboxWriter | None = None
    encode_refusal: RefusalEncoder | None = None  # needed when refusals are published

    async def write_and_commit(
        self,
        conn: AsyncConnection,
        changes: Sequence[tuple[Payment, Sequence[PaymentEvent]]],
        now: datetime,
        refusals: Sequence[ChargeRefusal] = (),
    ) -> bool:
        """Feed and outbox rows for these changes, outbox rows for the refusals (no payment:
        not in the feed), then COMMIT; whether outbox rows were written."""
        refused = False
        if refusals and self.outbox is not None:
            if self.encode_refusal is None:
                raise RuntimeError("EventLog: refusals published without encode_refusal")
            encode = self.encode_refusal
            refused = await self.outbox.write_refusals(
                conn, [(refusal, encode(refusal)) for refusal in refusals], now
            )
        recorded = [
            Recorded(payment, event, kind, self.encode(payment, event, kind))
            for payment, events in changes
            for event in events
            for kind in event_types(payment, event)
        ]
        if not recorded:
            await conn.commit()
            return refused
        wrote = self.outbox is not None and await self.outbox.write(conn, recorded, now)
        wrote = wrote or refused
        # The feed has one entry per event: the saga's extra `payment.completed` is published
        # only (the feed's consumers see the success as its own event).
        own = [item for item in recorded if item.kind == event_type(item.event)]
        if conn.dialect.name == "postgresql":
            await _append_and_commit_postgres(conn, own, now)
        else:
            await _append_to_feed(conn, own, now)
            await conn.commit()
        return wrote

    def wake(self) -> None:
        if self.outbox is not None:
            self.outbox.wake()


_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def _param_type(column: sa.Column[Any]) -> str:
    """The type a column's parameter is cast to: strings as text, so that the INSERT's
    assignment cast checks the length (an explicit cast to varchar(n) would cut a longer
    value short instead of refusing it)."""
    if isinstance(column.type, sa.String):
        return "text"
    return str(column.type.compile(dialect=_DIALECT))


_EVENT_NAMES = tuple(column.name for column in payment_events.columns)
_EVENT_COLUMNS = ", ".join(_EVENT_NAMES)
# One row of the statement below: an event's columns, then its feed row's own.
_ROW = ", ".join(
    f"%s::{t}" for t in (*(_param_type(c) for c in payment_events.columns), "text", "text", "bytea")
)
# A column's values as they are bound (UtcDateTime refuses a naive datetime).
_EVENT_BINDS = tuple(
    (i, column.type.process_bind_param)
    for i, column in enumerate(payment_events.columns)
    if isinstance(column.type, TypeDecorator)
)


@functools.lru_cache(maxsize=16)
def _events_and_feed(rows: int) -> str:
    """PostgreSQL: a transaction's payment events and their feed rows in one statement,
    sent with the COMMIT; the feed's `position` and `tx` are the columns' defaults, in the
    events' order. Scalar parameters (psycopg dumps those in C; a list parameter per
    column, unnest's, cost more CPU than the rows' other work together). Built from the
    table's metadata, so a new column is never left out; every value is a parameter."""
    values = ", ".join(f"({_ROW}, {n})" for n in range(rows))
    return f"""
        WITH e ({_EVENT_COLUMNS}, f_order_id, f_customer_id, f_payload, n) AS (
            VALUES {values}
        ), events AS (
            INSERT INTO payment_events ({_EVENT_COLUMNS}) SELECT {_EVENT_COLUMNS} FROM e
        )
        INSERT INTO payment_feed
            (payment_id, sequence, order_id, customer_id, status, payload, created_at)
        SELECT payment_id, sequence, f_order_id, f_customer_id, status, f_payload, %s
        FROM e
        ORDER BY n
    """  # noqa: S608


async def _append_and_commit_postgres(
    conn: AsyncConnection, recorded: Sequence[Recorded], now: datetime
) -> None:
    """The events' rows and their feed rows queued on the transaction's own connection,
    then SQLAlchemy's COMMIT, which sends them, whatever else is queued and COMMIT in one
    pipeline (pipelining.py); its errors are SQLAlchemy's (the unit of work maps those).
    `recorded`: each event once, as the feed has it."""
    parameters: list[Any] = []
    for item in recorded:
        columns = event_to_row(item.event)
        row = [columns[name] for name in _EVENT_NAMES]
        for i, bind in _EVENT_BINDS:
            row[i] = bind(row[i], _DIALECT)
        parameters += row
        parameters += (item.payment.order_id, item.payment.customer_id, item.payload)
    parameters.append(now)
    statement = _events_and_feed(len(recorded))
    fairy = await conn.get_raw_connection()
    driver = fairy.driver_connection
    if isinstance(driver, PipelinedConnection):
        driver.queue(statement, parameters, many=False)
    else:  # an engine not made by make_engine
        await conn.exec_driver_sql(statement, tuple(parameters))
    await conn.commit()


async def _append_to_feed(
    conn: AsyncConnection, recorded: Sequence[Recorded], now: datetime
) -> None:
    await conn.execute(
        payment_feed.insert(),
        [
            {
                "payment_id": item.event.payment_id,
                "sequence": item.event.sequence,
                "order_id": item.payment.order_id,
                "customer_id": item.payment.customer_id,
                "status": item.event.status.value,
                "payload": item.payload,
                "created_at": now,
            }
            for item in recorded
        ],
    )
