"""The change feed's reader (PaymentFeed): payment_feed rows after a (tx, position).

Writers take no lock and no counter, so rows do not commit in position order; the reader
hands out only rows below which nothing can still commit.

PostgreSQL: a row's `tx` (tables.py) is at least its own transaction's id. The reader
reads only rows with `tx` below the xmin of its statement's snapshot: every transaction
with an id below xmin has committed or aborted, and every transaction still to write a
row has an id of at least xmin, so of at least xmin as its rows' `tx` too. Nothing can
appear later below what was read, so (tx, position) order is final for what was handed
out. And a transaction that committed before another wrote its rows has the lower
(tx, position) (`tx` also covers every id below the writer's snapshot xmax): per payment,
events are in sequence order. The price: a transaction that has an id and stays open
(anywhere in the cluster) holds every later row back until it ends (README, "The change
feed"). Read-only transactions take no id and hold nothing back.

SQLite: one writer at a time; every `tx` is 0 and positions are in commit order.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from payment_grpc.adapters.db.reading import without_writer_lock
from payment_grpc.adapters.db.tables import payment_feed
from payment_grpc.service.ports import FeedEntry, FeedFilter, FeedPosition, FeedRead

_FEED = payment_feed.c
# xid8 has no cast to bigint; through text it has (xids stay far below 2^63).
_HORIZON = sa.text("pg_snapshot_xmin(pg_current_snapshot())::text::bigint")


class SqlPaymentFeed:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._horizon = engine.dialect.name == "postgresql"

    async def after(self, position: FeedPosition, where: FeedFilter, limit: int) -> FeedRead:
        """PostgreSQL: rows past the horizon are read too (without their payload), to tell
        the caller that some are held back; in (tx, position) order they all come after
        the final ones."""
        final = _FEED.tx < _HORIZON if self._horizon else sa.true()
        payload = sa.case((final, _FEED.payload)) if self._horizon else _FEED.payload
        query = sa.select(_FEED.tx, _FEED.position, payload, final).where(
            sa.tuple_(_FEED.tx, _FEED.position) > sa.tuple_(position.tx, position.id)
        )
        if where.order_id:
            query = query.where(_FEED.order_id == where.order_id)
        if where.customer_id:
            query = query.where(_FEED.customer_id == where.customer_id)
        if where.statuses:
            query = query.where(_FEED.status.in_(sorted(s.value for s in where.statuses)))
        query = query.order_by(_FEED.tx, _FEED.position).limit(limit)
        async with self._engine.connect() as conn:
            # One statement, one snapshot: the horizon and the rows it lets through.
            conn = await without_writer_lock(conn)
            rows = (await conn.execute(query)).all()
        entries = [
            FeedEntry(FeedPosition(tx, id_), data) for tx, id_, data, is_final in rows if is_final
        ]
        return FeedRead(entries, held=len(entries) < len(rows))
