"""Writers queue for the database's writer rather than fail, and never stop the loop while
they wait (issue 12: SQLite Charges answered UNAVAILABLE under load).

SQLite runs its statements on the loop's own thread (adapters/db/sqlite_inline.py): a
writer waits for the engine's writer lock (asyncio, first come first served) and, when a
writer outside the engine holds SQLite's lock, retries BEGIN IMMEDIATE after an asyncio
sleep. PostgreSQL queues writers of one row on its row lock. Either way: a burst of writers
behind a slow one all commit once it does, within the lock timeout; a writer held up
longer than the lock timeout is UNAVAILABLE (StorageUnavailable); and the loop keeps
running meanwhile.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from payment_grpc.adapters.db.crypto import FieldCipher
from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory, Timeouts, make_engine
from payment_grpc.adapters.db.reading import without_writer_lock
from payment_grpc.service.errors import StorageUnavailable
from tests.helpers.credentials import TEST_ENCRYPTION_KEYS

WAITERS = 10  # fewer than the pool holds (SQLite: 5 + 10 overflow), the holder included
TOUCH = sa.text("UPDATE alembic_version SET version_num = version_num")
HOLD = {
    "sqlite": TOUCH,  # any write: SQLite's one writer lock
    "postgresql": sa.text("LOCK TABLE idempotency_keys IN SHARE ROW EXCLUSIVE MODE"),
}
AIOSQLITE_WORKER = "_connection_worker_thread"  # aiosqlite's thread target


def _sent_by(engine: AsyncEngine, tasks: set[asyncio.Task[Any]]) -> asyncio.Semaphore:
    """Released once per statement (BEGIN included) a task of `tasks` sends."""
    sent = asyncio.Semaphore(0)

    @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _sent(*_args: Any) -> None:
        if asyncio.current_task() in tasks:
            sent.release()

    return sent


async def test_writers_queue_behind_a_slow_writer_and_all_commit(database_url: str) -> None:
    engine = make_engine(database_url, timeouts=Timeouts(lock=30.0))
    workers_before = {t for t in threading.enumerate() if AIOSQLITE_WORKER in t.name}
    waiters: set[asyncio.Task[Any]] = set()
    sent = _sent_by(engine, waiters)
    committed: list[int] = []

    async def write(n: int) -> None:
        async with engine.begin() as conn:
            await conn.execute(TOUCH)
        committed.append(n)

    try:
        async with engine.begin() as holder:
            await holder.execute(TOUCH)  # the writer lock (SQLite) / the row lock is ours
            waiters.update(asyncio.ensure_future(write(n)) for n in range(WAITERS))
            for _ in range(WAITERS):
                await sent.acquire()  # every waiter asked for the lock; the loop runs
            assert committed == []
        await asyncio.gather(*waiters)
        assert sorted(committed) == list(range(WAITERS))
        workers_now = {t for t in threading.enumerate() if AIOSQLITE_WORKER in t.name}
        assert workers_now - workers_before == set()  # no statement went to a thread
    finally:
        await engine.dispose()


async def test_a_writer_held_up_past_the_lock_timeout_is_unavailable(database_url: str) -> None:
    """Another engine (on SQLite: as another process would) holds the writer: the writer
    waits without stopping the loop, and gives up after the lock timeout."""
    other = make_engine(database_url)
    engine = make_engine(database_url, timeouts=Timeouts(lock=0.3))
    uow = SqlUnitOfWorkFactory(engine, FieldCipher.from_spec(TEST_ENCRYPTION_KEYS))
    writers: set[asyncio.Task[Any]] = set()
    sent = _sent_by(engine, writers)
    loop_turns = 0

    async def write() -> None:
        async with uow() as tx:
            await tx.idempotency.release_locks_of("nobody")  # an UPDATE
            await tx.commit()

    try:
        async with other.begin() as holder:
            await holder.execute(HOLD[holder.dialect.name])  # conflicts with the UPDATE
            writer = asyncio.ensure_future(write())
            writers.add(writer)
            await sent.acquire()
            while not writer.done():  # the loop goes on while the writer waits
                loop_turns += 1
                await asyncio.sleep(0)
            with pytest.raises(StorageUnavailable):
                writer.result()
        assert loop_turns > 1
        writers.clear()
        await write()  # the writer is free again
    finally:
        await engine.dispose()
        await other.dispose()


async def test_a_read_cut_on_its_thread_blocks_neither_the_loop_nor_writers(
    tmp_path: pathlib.Path, sqlite_template: pathlib.Path
) -> None:
    """SQLite only (PostgreSQL reads wait on the socket, not on a thread): a read outside a
    write transaction runs on a thread, so a long one never stops the loop; cut meanwhile,
    its connection is closed once the read is over, and writers go on."""
    path = tmp_path / "payments.db"
    shutil.copyfile(sqlite_template, path)
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    entered, release = threading.Event(), threading.Event()

    def held() -> int:
        entered.set()
        release.wait(30)
        return 1

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _function(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("held", 0, held)

    async def read() -> None:
        async with engine.connect() as conn:
            conn = await without_writer_lock(conn)
            await conn.execute(sa.text("SELECT held()"))

    try:
        reader = asyncio.ensure_future(read())
        await asyncio.to_thread(entered.wait, 30)  # the read runs on its thread
        reader.cancel()
        async with engine.begin() as conn:  # the loop runs, the writer is free
            assert (await conn.execute(TOUCH)).rowcount == 1
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await reader
        async with engine.begin() as conn:
            assert (await conn.execute(TOUCH)).rowcount == 1
    finally:
        release.set()
        await engine.dispose()
