"""Processed gateway events: INSERT ... ON CONFLICT DO NOTHING makes the event id the
dedupe key, also between two replicas receiving the same webhook at once."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.adapters.db.tables import gateway_events
from payment_grpc.service.ports import GatewayNotice

_ADD = {
    "postgresql": postgresql.insert(gateway_events)
    .on_conflict_do_nothing(index_elements=["event_id"])
    .returning(gateway_events.c.event_id),
    "sqlite": sqlite.insert(gateway_events)
    .on_conflict_do_nothing(index_elements=["event_id"])
    .returning(gateway_events.c.event_id),
}
_SEEN = sa.select(gateway_events.c.event_id).where(
    gateway_events.c.event_id == sa.bindparam("b_id")
)


class SqlGatewayEventRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, notice: GatewayNotice, received_at: datetime) -> bool:
        dialect = "postgresql" if self._conn.dialect.name == "postgresql" else "sqlite"
        row = {
            "event_id": notice.event_id,
            "event_type": notice.event_type[:100],
            "payment_id": notice.payment_id,
            "detail": notice.detail[:500],
            "received_at": received_at,
        }
        return (await self._conn.execute(_ADD[dialect], row)).first() is not None

    async def seen(self, event_id: str) -> bool:
        return (await self._conn.execute(_SEEN, {"b_id": event_id})).first() is not None
