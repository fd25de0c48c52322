"""Opening an aiosqlite connection without leaving its worker thread behind.

aiosqlite answers each call from its worker thread with `loop.call_soon_threadsafe`. When
`await aiosqlite.connect(...)` fails (the file cannot be opened) or its caller is cancelled
mid-open (a readiness check or a first ledger read cut by shutdown), aiosqlite queues the
thread's stop without waiting for it and drops the connection: nobody can close it, and the
thread answers later into whatever loop is left. Once the process has closed its loop that
answer is "RuntimeError: Event loop is closed" in a thread traceback at exit.

`connect` opens the sqlite3 connection in the loop's executor first (its errors are raised
there, before any aiosqlite thread exists), then hands it to aiosqlite, and runs the whole
open to its end even if the caller is cancelled, closing what it opened in that case.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import aiosqlite


async def connect(database: str, **kwargs: Any) -> aiosqlite.Connection:
    """`aiosqlite.connect(database, **kwargs)`, awaited; a failed or cancelled open leaves
    no worker thread running."""
    opening = asyncio.ensure_future(_open(database, kwargs))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # its error is nobody's any more
            db = await opening
            await db.close()
        raise


async def _open(database: str, kwargs: dict[str, Any]) -> aiosqlite.Connection:
    def connector() -> sqlite3.Connection:
        raw: sqlite3.Connection = sqlite3.connect(database, check_same_thread=False, **kwargs)
        return raw

    raw = await asyncio.to_thread(connector)
    db = aiosqlite.Connection(lambda: raw, iter_chunk_size=64)
    try:
        return await db  # only starts the worker thread: the connection is open already
    except BaseException:
        raw.close()
        raise
