"""What a transaction's payment events imply, written in that transaction right before
COMMIT (called by the unit of work): the change feed rows (every event, a global
position each) and the outbox rows (per sink). Each event is encoded once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.adapters.db.outbox import EventEncoder, OutboxWriter, Recorded
from payment_grpc.adapters.db.tables import feed_counter, payment_feed
from payment_grpc.domain.payment import Payment, PaymentEvent
from payment_grpc.service.outbox import event_type, event_types

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

    async def write(
        self,
        conn: AsyncConnection,
        changes: Sequence[tuple[Payment, Sequence[PaymentEvent]]],
        now: datetime,
    ) -> bool:
        """Feed and outbox rows for these changes; whether outbox rows were written."""
        recorded = [
            Recorded(payment, event, kind, self.encode(payment, event, kind))
            for payment, events in changes
            for event in events
            for kind in event_types(payment, event)
        ]
        if not recorded:
            return False
        wrote = self.outbox is not None and await self.outbox.write(conn, recorded, now)
        # The feed has one entry per event: the saga's extra `payment.completed` is published
        # only (the feed's consumers see the success as its own event).
        own = [item for item in recorded if item.kind == event_type(item.event)]
        await _append_to_feed(conn, own, now)
        return wrote

    def wake(self) -> None:
        if self.outbox is not None:
            self.outbox.wake()


# PostgreSQL: the same in one statement (one round trip, and the counter row is held for
# one round trip less): the positions taken, then the rows inserted with them.
_APPEND_POSTGRES = sa.text(
    """
    WITH taken AS (
        UPDATE feed_counter SET last_position = last_position + :count WHERE id = 1
        RETURNING last_position
    )
    INSERT INTO payment_feed
        (position, payment_id, sequence, order_id, customer_id, status, payload, created_at)
    SELECT taken.last_position - :count + e.n, e.payment_id, e.sequence, e.order_id,
           e.customer_id, e.status, e.payload, :created_at
    FROM taken, unnest(
        CAST(:payment_ids AS text[]), CAST(:sequences AS bigint[]),
        CAST(:order_ids AS text[]), CAST(:customer_ids AS text[]),
        CAST(:statuses AS text[]), CAST(:payloads AS bytea[])
    ) WITH ORDINALITY AS e(payment_id, sequence, order_id, customer_id, status, payload, n)
    """
)


async def _append_to_feed(
    conn: AsyncConnection, recorded: Sequence[Recorded], now: datetime
) -> None:
    if conn.dialect.name == "postgresql":
        result = await conn.execute(
            _APPEND_POSTGRES,
            {
                "count": len(recorded),
                "created_at": now,
                "payment_ids": [item.event.payment_id for item in recorded],
                "sequences": [item.event.sequence for item in recorded],
                "order_ids": [item.payment.order_id for item in recorded],
                "customer_ids": [item.payment.customer_id for item in recorded],
                "statuses": [item.event.status.value for item in recorded],
                "payloads": [item.payload for item in recorded],
            },
        )
        if result.rowcount != len(recorded):  # no counter row: the schema is not migrated
            raise RuntimeError("payment_feed: the feed counter row is missing")
        return
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
