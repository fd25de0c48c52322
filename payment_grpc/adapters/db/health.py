"""Is the database reachable right now? Used by the gRPC health status."""

from __future__ import annotations

import asyncio

import aiosqlite
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

PING_TIMEOUT_S = 2.0


async def database_reachable(engine: AsyncEngine, url: str) -> bool:
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            if engine.dialect.name == "sqlite":
                return await _sqlite_file_opens(url)
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
    except Exception:
        return False
    return True


async def _sqlite_file_opens(url: str) -> bool:
    """Open the file read-write without creating it: a missing or unreadable file fails,
    which pooled connections (holding an open descriptor) would not notice."""
    database = make_url(url).database or ""
    async with aiosqlite.connect(f"file:{database}?mode=rw", uri=True) as db:
        await db.execute("SELECT 1 FROM alembic_version")
    return True
