"""The change feed's reader (PaymentFeed): payment_feed rows after a position."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from payment_grpc.adapters.db.tables import payment_feed
from payment_grpc.service.ports import FeedEntry, FeedFilter


class SqlPaymentFeed:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def after(self, position: int, where: FeedFilter, limit: int) -> list[FeedEntry]:
        query = sa.select(payment_feed.c.position, payment_feed.c.payload).where(
            payment_feed.c.position > position
        )
        if where.order_id:
            query = query.where(payment_feed.c.order_id == where.order_id)
        if where.customer_id:
            query = query.where(payment_feed.c.customer_id == where.customer_id)
        if where.statuses:
            query = query.where(payment_feed.c.status.in_(sorted(s.value for s in where.statuses)))
        query = query.order_by(payment_feed.c.position).limit(limit)
        async with self._engine.connect() as conn:
            conn = await conn.execution_options(sqlite_begin="DEFERRED")
            rows = (await conn.execute(query)).all()
        return [FeedEntry(position, payload) for position, payload in rows]
