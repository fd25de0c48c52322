"""What a transaction's payment events imply, written in that transaction right before
COMMIT (called by the unit of work): the change feed rows (every event, a global
position each) and the outbox rows (per sink). Each event is encoded once.

The feed's positions come from a one-row counter taken last, so transactions get them in
the order they commit (a reader resuming after a position misses nothing); that row stays
locked until COMMIT, so the time between taking it and committing is what bounds how many
event-writing transactions commit per second. On PostgreSQL the positions, the feed rows
and the COMMIT go in one round trip (psycopg pipeline): the row is held for the server's
own work and the WAL flush, not also for a round trip and the event loop's turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.adapters.db.outbox import EventEncoder, OutboxWriter, Recorded, RefusalEncoder
from payment_grpc.adapters.db.tables import feed_counter, payment_feed
from payment_grpc.domain.payment import Payment, PaymentEvent
from payment_grpc.service.outbox import event_type, event_types
from payment_grpc.service.ports import ChargeRefusal

# Taken last in the transaction: the counter row stays locked only for the COMMIT, and
# transactions get their positions in the order they commit.
_TAKE_POSITIONS = (
    feed_counter.update()
    .where(feed_counter.c.id == 1)
    .values(last_position=feed_counter.c.last_position + sa.bindparam("b_count"))
    .returning(feed_counter.c.last_position)
)


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


# PostgreSQL: the same in one statement, sent with the COMMIT (psycopg's own parameters):
# the positions taken, then the rows inserted with them.
_APPEND_POSTGRES = """
    WITH taken AS (
        UPDATE feed_counter SET last_position = last_position + %(count)s WHERE id = 1
        RETURNING last_position
    )
    INSERT INTO payment_feed
        (position, payment_id, sequence, order_id, customer_id, status, payload, created_at)
    SELECT taken.last_position - %(count)s + e.n, e.payment_id, e.sequence, e.order_id,
           e.customer_id, e.status, e.payload, %(created_at)s
    FROM taken, unnest(
        %(payment_ids)s::text[], %(sequences)s::bigint[], %(order_ids)s::text[],
        %(customer_ids)s::text[], %(statuses)s::text[], %(payloads)s::bytea[]
    ) WITH ORDINALITY AS e(payment_id, sequence, order_id, customer_id, status, payload, n)
"""


async def _append_and_commit_postgres(
    conn: AsyncConnection, recorded: Sequence[Recorded], now: datetime
) -> None:
    """The feed rows and COMMIT in one pipeline on the transaction's own connection, then
    SQLAlchemy's COMMIT, which finds the transaction over and sends nothing. psycopg's
    errors are raised as SQLAlchemy's (the unit of work maps those)."""
    fairy = await conn.get_raw_connection()
    driver: psycopg.AsyncConnection[Any] = fairy.driver_connection  # type: ignore[assignment]
    parameters = {
        "count": len(recorded),
        "created_at": now,
        "payment_ids": [item.event.payment_id for item in recorded],
        "sequences": [item.event.sequence for item in recorded],
        "order_ids": [item.payment.order_id for item in recorded],
        "customer_ids": [item.payment.customer_id for item in recorded],
        "statuses": [item.event.status.value for item in recorded],
        "payloads": [item.payload for item in recorded],
    }
    try:
        async with driver.pipeline():
            cursor = await driver.execute(_APPEND_POSTGRES, parameters)
            await driver.commit()
    except psycopg.Error as exc:
        disconnect = conn.dialect.is_disconnect(cast(Any, exc), None, None)
        if disconnect:
            await conn.invalidate()
        error = DBAPIError.instance(
            _APPEND_POSTGRES, None, exc, psycopg.Error, connection_invalidated=disconnect
        )
        raise error from exc
    if cursor.rowcount != len(recorded):  # no counter row: the schema is not migrated
        raise RuntimeError("payment_feed: the feed counter row is missing")
    await conn.commit()


async def _append_to_feed(
    conn: AsyncConnection, recorded: Sequence[Recorded], now: datetime
) -> None:
    last = (await conn.execute(_TAKE_POSITIONS, {"b_count": len(recorded)})).scalar_one()
    first = last - len(recorded) + 1
    await conn.execute(
        payment_feed.insert(),
        [
            {
                "position": first + offset,
                "payment_id": item.event.payment_id,
                "sequence": item.event.sequence,
                "order_id": item.payment.order_id,
                "customer_id": item.payment.customer_id,
                "status": item.event.status.value,
                "payload": item.payload,
                "created_at": now,
            }
            for offset, item in enumerate(recorded)
        ],
    )
