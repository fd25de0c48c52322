"""A SQLite connection whose read was cut and which SQLAlchemy then stopped closes
quietly (adapters/db/sqlite_inline.py): aiosqlite's close raised "Connection closed" into
SQLAlchemy's graceful-close task, logged with a traceback at a replica's shutdown
(test_replica_gone[sqlite] in CI)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sqlite3
import threading

from payment_grpc.adapters.db.sqlite_inline import inline_connector


async def test_a_connection_stopped_after_a_cut_read_closes_quietly(tmp_path: pathlib.Path) -> None:
    conn = await inline_connector(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", 5.0)()
    release, started = threading.Event(), threading.Event()

    def held() -> int:
        started.set()
        release.wait(10)
        return 1

    raw = conn._connection
    assert isinstance(raw, sqlite3.Connection)
    raw.create_function("held", 0, held)
    read = asyncio.create_task(conn.execute("SELECT held()"))
    await asyncio.to_thread(started.wait, 10)  # the read runs on its thread
    read.cancel()  # the call is cut: its read goes on
    with contextlib.suppress(asyncio.CancelledError):
        await read
    conn.stop()  # SQLAlchemy's terminate: deferred until the read is over
    release.set()
    await conn.close()  # its graceful close: nothing left to close, no error
    assert conn._connection is None
