"""SQLite on the event loop's own thread: aiosqlite's connection without its thread.

aiosqlite runs every call on a thread of its own and hands the result back through the
loop: a statement through SQLAlchemy was 3-4 such handoffs (cursor, execute, fetch,
close), ~40 per Charge, each a wake-up of the other thread and a fight for the GIL; under
load the worker thread waited for the GIL while its transaction held SQLite's writer lock,
and the other connections' BEGIN IMMEDIATE slept in SQLite's busy handler (bench/README,
16:40-18:30 UTC). Our statements take tens of microseconds and a COMMIT in WAL mode with
`synchronous=NORMAL` writes the WAL without waiting for the disk, so they run here, inline:
`InlineConnection` is aiosqlite's `Connection` whose calls run at once on the caller's thread
(its request queue runs each request as it is put; no thread is started). SQLAlchemy's
aiosqlite dialect drives it unchanged (`create_async_engine(async_creator=...)`).

The loop must never wait in SQLite's busy handler (nothing else would run meanwhile, the
writer it waits for included), so:

- one writer at a time in this engine: a connection takes the engine's `WriterLock`
  (asyncio, first come first served) before the statement that makes it a writer (BEGIN
  IMMEDIATE, or a write outside a transaction) and gives it back as soon as its
  transaction is over (COMMIT, ROLLBACK, an error that ended it, close). A Charge queues
  there for the single writer instead of polling for it; it waits at most the lock timeout
  (`DB_LOCK_TIMEOUT_SECONDS`), then fails with SQLite's own "database is locked" (the call
  is UNAVAILABLE, as after SQLite's busy timeout before);
- SQLite's busy timeout is 0: a writer outside this engine (another process, a second
  engine on the file) makes BEGIN IMMEDIATE fail at once, and it is tried again after an
  asyncio sleep (backoff) until the same deadline. Readers never wait in WAL mode.

The aiosqlite internals used (`_execute`, `_tx`, `_connection`, `stop`) are those
SQLAlchemy's own adapter relies on, with aiosqlite pinned (requirements.lock).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Generator
from functools import partial
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import make_url

# A statement that writes (or takes the writer lock) when it runs; anything else only reads.
_WRITES = ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE", "INSERT", "UPDATE", "DELETE", "REPLACE")
_WRITES_DDL = ("CREATE", "DROP", "ALTER")
# The sqlite3 calls that step through rows: a read's time is spent there.
_READ_STEPS = frozenset(
    ("execute", "executemany", "executescript", "fetchone", "fetchmany", "fetchall")
)
_BUSY_RETRY_FIRST_S = 0.001
_BUSY_RETRY_MAX_S = 0.05


class WriterLock:
    """The engine's single writer: asyncio.Lock with a bounded wait."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = asyncio.Lock()

    async def acquire(self, deadline: float) -> None:
        """Free and nobody queued: at once, without suspending."""
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._lock.acquire()
        except TimeoutError:
            raise sqlite3.OperationalError("database is locked") from None

    def release(self) -> None:
        self._lock.release()


class _RunAtOnce:
    """aiosqlite's request queue, each request run as it is put (SQLAlchemy's adapter puts
    some requests on it directly: the isolation level)."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as exc:
            if future is None:
                raise
            future.set_exception(exc)
        else:
            if future is not None:
                future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    def __init__(self, connector: Callable[[], sqlite3.Connection], writer: WriterLock) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _RunAtOnce()  # type: ignore[assignment]
        self._writer = writer
        self._holds_writer = False
        self._reading: asyncio.Future[Any] | None = None  # a read on its thread
        self._closing_after_read = False

    def __await__(self) -> Generator[Any, None, InlineConnection]:  # no thread to start
        return self._connect_here().__await__()

    async def _connect_here(self) -> InlineConnection:
        await self._connect()
        return self

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._reading is not None:  # a cut call's read still runs on its thread
            await asyncio.wait([self._reading])
        conn = self._connection
        if not self._running or conn is None:
            raise ValueError("Connection closed")
        if self._holds_writer:
            try:
                return fn(*args, **kwargs)
            finally:
                self._release_if_over()
        if _writes(fn, args):
            deadline = time.monotonic() + self._writer.timeout
            await self._writer.acquire(deadline)
            self._holds_writer = True
            try:
                return await _until_not_busy(partial(_now, fn, *args, **kwargs), deadline)
            finally:
                self._release_if_over()
        if getattr(fn, "__name__", "") in _READ_STEPS and not _begins(args):
            # A read outside a write transaction may be long (a listing, a scan): on a
            # thread, as aiosqlite did, so that it never stops the loop. WAL readers still
            # meet SQLITE_BUSY at times (the first connection after a crash recovers the
            # WAL under an exclusive lock; an exclusive-mode connection): with the busy
            # timeout at 0, a statement is tried again as a write is, not failed at once.
            call = partial(self._read_on_thread, partial(fn, *args, **kwargs))
            if fn.__name__ != "execute":  # a fetch is not started again
                return await call()
            return await _until_not_busy(call, time.monotonic() + self._writer.timeout)
        return fn(*args, **kwargs)

    async def _read_on_thread(self, call: Callable[[], Any]) -> Any:
        reading = asyncio.get_running_loop().run_in_executor(None, call)
        self._reading = reading
        try:
            return await asyncio.shield(reading)
        finally:
            if reading.done():
                self._reading = None
            else:  # cut: whatever comes next waits for its end
                reading.add_done_callback(self._read_over)

    def _read_over(self, reading: asyncio.Future[Any]) -> None:
        if self._reading is reading:
            self._reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved: a cut call's error is nobody's
        if self._closing_after_read:
            self.stop()

    async def close(self) -> None:
        """Close, after a cut call's read on its thread. A connection stopped meanwhile
        (SQLAlchemy terminates a connection whose call was cut, then closes it gracefully
        in a task of its own) has nothing left to close: aiosqlite's close would raise
        "Connection closed" into that task, logged as never retrieved at shutdown."""
        if self._reading is not None:
            await asyncio.wait([self._reading])  # its _read_over (and a stop) run first
        if not self._running:
            return
        await super().close()

    def stop(self) -> asyncio.Future[Any] | None:
        """Close now (SQLAlchemy's terminate, the garbage collector); the writer lock too.
        A cut call's read still running on its thread: once it is over."""
        if self._reading is not None:
            self._closing_after_read = True
            return None
        future = super().stop()
        self._release_if_over()
        return future

    def roll_back_now(self) -> None:
        """End the transaction at once, outside any task (engine.py's invalidate listener).
        Not while a read runs on its thread: a reader holds no writer lock, and the close
        that follows waits for the read."""
        if self._connection is not None and self._reading is None:
            self._connection.rollback()
        self._release_if_over()

    def _release_if_over(self) -> None:
        if self._holds_writer and not _in_transaction(self._connection):
            self._holds_writer = False
            self._writer.release()


def _in_transaction(conn: sqlite3.Connection | None) -> bool:
    if conn is None:
        return False
    try:
        return conn.in_transaction
    except sqlite3.ProgrammingError:  # closed
        return False


def _writes(fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    if not args or not isinstance(args[0], str):
        return False
    if getattr(fn, "__name__", "") not in ("execute", "executemany", "executescript"):
        return False
    head = args[0].lstrip()[:15].upper()
    return head.startswith(_WRITES) or head.startswith(_WRITES_DDL)


def _begins(args: tuple[Any, ...]) -> bool:
    """A BEGIN (DEFERRED): it reads nothing yet."""
    return bool(args) and isinstance(args[0], str) and args[0].lstrip()[:5].upper() == "BEGIN"


async def _now(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn` run at once on the loop's thread, as a coroutine for _until_not_busy."""
    return fn(*args, **kwargs)


async def _until_not_busy(call: Callable[[], Awaitable[Any]], deadline: float) -> Any:
    """Run `call`; while SQLite answers busy (another process holds its writer lock, or a
    WAL recovery runs), try again after an asyncio sleep (never in SQLite's busy handler,
    which would stop the loop)."""
    delay = _BUSY_RETRY_FIRST_S
    while True:
        try:
            return await call()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, _BUSY_RETRY_MAX_S)


def _busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == sqlite3.SQLITE_BUSY)
    return "database is locked" in str(exc)


def inline_connector(url: str, lock_timeout: float) -> Callable[[], Awaitable[InlineConnection]]:
    """`async_creator` for create_async_engine: connections to the URL's database (its
    query options as SQLAlchemy's sqlite dialect reads them), one writer lock for all."""
    args, options = SQLiteDialect_pysqlite().create_connect_args(make_url(url))
    options = {**options, "timeout": 0, "check_same_thread": False}
    writer = WriterLock(lock_timeout)

    async def connect() -> InlineConnection:
        return await InlineConnection(partial(sqlite3.connect, *args, **options), writer)

    return connect
