"""What a transaction's payment events imply, written in that transaction right before
COMMIT (called by the unit of work): the change feed rows (every event) and the outbox
rows (per sink). Each event is encoded once.

The feed rows take their place in the feed, (tx, position), from the database's defaults
(tables.py): no counter and no lock, so event-writing transactions commit side by side.
On PostgreSQL the feed rows go out with the COMMIT, in one round trip (pipelining.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.adapters.db.outbox import EventEncoder, OutboxWriter, Recorded, RefusalEncoder
from payment_grpc.adapters.db.pipelining import PipelinedConnection
from payment_grpc.adapters.db.tables import payment_feed
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


# PostgreSQL: the rows in one statement, sent with the COMMIT (psycopg's own parameters);
# `position` and `tx` are the columns' defaults.
_APPEND_POSTGRES = """
    INSERT INTO payment_feed
        (payment_id, sequence, order_id, customer_id, status, payload, created_at)
    SELECT e.payment_id, e.sequence, e.order_id, e.customer_id, e.status, e.payload,
           %(created_at)s
    FROM unnest(
        %(payment_ids)s::text[], %(sequences)s::bigint[], %(order_ids)s::text[],
        %(customer_ids)s::text[], %(statuses)s::text[], %(payloads)s::bytea[]
    ) WITH ORDINALITY AS e(payment_id, sequence, order_id, customer_id, status, payload, n)
    ORDER BY e.n
"""


async def _append_and_commit_postgres(
    conn: AsyncConnection, recorded: Sequence[Recorded], now: datetime
) -> None:
    """The feed rows queued on the transaction's own connection, then SQLAlchemy's COMMIT,
    which sends them, whatever else is queued and COMMIT in one pipeline (pipelining.py);
    its errors are SQLAlchemy's (the unit of work maps those)."""
    parameters = {
        "created_at": now,
        "payment_ids": [item.event.payment_id for item in recorded],
        "sequences": [item.event.sequence for item in recorded],
        "order_ids": [item.payment.order_id for item in recorded],
        "customer_ids": [item.payment.customer_id for item in recorded],
        "statuses": [item.event.status.value for item in recorded],
        "payloads": [item.payload for item in recorded],
    }
    fairy = await conn.get_raw_connection()
    driver = fairy.driver_connection
    if isinstance(driver, PipelinedConnection):
        driver.queue(_APPEND_POSTGRES, parameters, many=False)
    else:  # an engine not made by make_engine
        await conn.exec_driver_sql(_APPEND_POSTGRES, parameters)
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
