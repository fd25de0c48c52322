"""Transactions cut by a cancellation (a deadline, a client gone) leave no lock behind,
even while something still references the cut calls' tracebacks (issue 13).

On SQLite SQLAlchemy closes the connection of a call cut during a statement. A statement
already handed to aiosqlite's thread still runs there (a BEGIN IMMEDIATE that was
waiting takes the writer lock once it is free), and sqlite3 kept the closed connection
open as a "zombie" as long as its statements were referenced (by the traceback, until
the garbage collector ran), transaction and writer lock included: every later write
failed after the busy timeout. test_interrupted_keys[sqlite] hung that way.

SQLite's statements now run on the loop's thread (adapters/db/sqlite_inline.py): a call
is cut while it waits for the engine's writer lock, or mid-transaction while it awaits
something else (here a plain yield between statements), never inside a statement.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import sqlalchemy as sa

from payment_grpc.adapters.db.engine import Timeouts, make_engine

ROUNDS = 10
WRITERS = 6  # at once: one holds the writer lock, the others wait for it
STATEMENTS = 20  # sent by the writers of a round before they are cut
TOUCH = sa.text("UPDATE alembic_version SET version_num = version_num")
READ = sa.text("SELECT version_num FROM alembic_version")


async def test_calls_cut_mid_transaction_leave_the_database_writable(database_url: str) -> None:
    engine = make_engine(database_url, timeouts=Timeouts(lock=2.0))
    writers: set[asyncio.Task[None]] = set()
    sent = asyncio.Semaphore(0)  # one release per writer statement sent to the database
    kept: list[BaseException] = []  # the cut calls' errors, still referenced (a log, a task)

    @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _sent(*_args: Any) -> None:
        if asyncio.current_task() in writers:
            sent.release()

    async def writing() -> None:
        try:
            while True:
                async with engine.connect() as conn:
                    await conn.begin()
                    for _ in range(STATEMENTS):
                        await conn.execute(TOUCH)
                        await asyncio.sleep(0)  # the transaction awaits something else
                        await conn.execute(READ)
                    await conn.commit()
        except BaseException as error:
            kept.append(error)
            raise

    gc.disable()  # as in a busy server, where the collector had not run yet
    try:
        for _ in range(ROUNDS):
            sent = asyncio.Semaphore(0)  # this round's statements only
            writers = {asyncio.ensure_future(writing()) for _ in range(WRITERS)}
            for _ in range(STATEMENTS):
                await sent.acquire()
            for task in writers:
                task.cancel()  # each while it waits on a statement or the writer lock
            await asyncio.gather(*writers, return_exceptions=True)
        async with engine.begin() as conn:  # a write, within the lock timeout
            result: Any = await conn.execute(TOUCH)
        assert result.rowcount == 1
        assert len(kept) == ROUNDS * WRITERS
    finally:
        gc.enable()
        await engine.dispose()
