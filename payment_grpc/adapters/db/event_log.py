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
