"""Is the database reachable right now? Used by the gRPC health status.

The probe never queues behind requests: on PostgreSQL it keeps one connection of its own
(outside the request pool), so a pool saturated by calls waiting on a locked row does not
turn readiness NOT_SERVING and take a replica that still serves out of the Service.
"""

from __future__ import annotations

import asyncio
import sqlite3

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from payment_grpc.adapters.db.engine import Timeouts, is_sqlite, postgres_options

PING_TIMEOUT_S = 2.0


class DatabaseProbe:
    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: AsyncEngine | None = None
        if not is_sqlite(url):
            timeouts = Timeouts(lock=PING_TIMEOUT_S, statement=PING_TIMEOUT_S)
            self._engine = create_async_engine(
                url,
                pool_size=1,
                max_overflow=0,
                pool_timeout=PING_TIMEOUT_S,
                connect_args={"options": postgres_options(timeouts)},
            )

    async def reachable(self) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                if self._engine is None:
                    return await _sqlite_file_opens(self._url)
                async with self._engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        except Exception:
            return False
        return True

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()


async def _sqlite_file_opens(url: str) -> bool:
    """Open the file read-write without creating it: a missing or unreadable file fails,
    which pooled connections (holding an open descriptor) would not notice.

    Plain sqlite3 in a worker thread, not aiosqlite: a check cut by its timeout or by
    shutdown lets the thread finish and close the file on its own, and nothing answers
    into the event loop afterwards (an aiosqlite open cut half-way left its thread behind
    to answer into a closed loop at exit)."""
    database = make_url(url).database or ""
    return await asyncio.to_thread(_opens_read_write, database)


def _opens_read_write(database: str) -> bool:
    db = sqlite3.connect(f"file:{database}?mode=rw", uri=True, timeout=PING_TIMEOUT_S)
    try:
        db.execute("SELECT 1 FROM alembic_version").fetchall()
    finally:
        db.close()
    return True
