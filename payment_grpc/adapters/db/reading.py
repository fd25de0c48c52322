"""Read-only connections: no writer lock on SQLite, no transaction round trips on PostgreSQL.

Its own module so that every adapter can use it, the outbox included (engine.py imports
the outbox through the event log).
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection


async def without_writer_lock(conn: AsyncConnection) -> AsyncConnection:
    """For a read-only transaction: on SQLite it begins DEFERRED, taking no writer lock; on
    PostgreSQL each statement runs on its own (autocommit: no BEGIN and ROLLBACK round
    trips; under READ COMMITTED every statement had its own snapshot anyway)."""
    if conn.dialect.name != "sqlite":
        return await conn.execution_options(isolation_level="AUTOCOMMIT")
    return await conn.execution_options(sqlite_begin="DEFERRED")
