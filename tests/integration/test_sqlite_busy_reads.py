"""SQLite answers busy to WAL readers at times: the first connection after a crash
recovers the WAL under an exclusive lock, and an exclusive-mode connection holds one. The
engine's busy timeout is 0 (adapters/db/sqlite_inline.py: the loop never waits in SQLite's
busy handler), so a read meeting such a lock is tried again after an asyncio sleep, as a
write is, until the lock timeout; before, it failed at once, and the restarted replica of
test_crash_recovery_stripe answered UNAVAILABLE. SQLite only: PostgreSQL has no such lock."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3

import pytest
import sqlalchemy as sa

from payment_grpc.adapters.db.engine import Timeouts, make_engine


def exclusive_holder(path: pathlib.Path) -> sqlite3.Connection:
    """A connection holding the database's exclusive lock until it is closed."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (2)")
    holder.execute("COMMIT")  # the lock stays: exclusive locking mode
    return holder


async def test_a_read_meeting_an_exclusive_lock_waits_for_it(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "busy.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}", timeouts=Timeouts(lock=10))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
            await conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        await engine.dispose()  # no connection of the engine open: the holder's turn
        holder = exclusive_holder(path)
        with pytest.raises(sqlite3.OperationalError, match="locked"):  # readers are held
            sqlite3.connect(path, timeout=0).execute("SELECT x FROM t").fetchall()
        # Let go once the read below has met the lock (it meets it at once: timeout 0); its
        # new connection's first statements meet it too, as after a crash.
        asyncio.get_running_loop().call_later(0.2, holder.close)
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT x FROM t ORDER BY x"))).all()
        assert [row.x for row in rows] == [1, 2]
    finally:
        await engine.dispose()
