"""Transactions in fewer round trips (adapters/db/pipelining.py, issue 12): on PostgreSQL
BEGIN goes out with the transaction's first statement, and `write_behind` statements with
the next statement that waits for an answer or with the COMMIT. What a transaction does
must not change: the same rows commit or roll back, a statement sees the writes before it,
a failed queued write commits nothing. Each test runs on SQLite too (nothing is queued
there: the same outcomes)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from payment_grpc.adapters.db.engine import Timeouts, make_engine
from payment_grpc.adapters.db.pipelining import write_behind
from payment_grpc.adapters.db.reading import without_writer_lock

INSERT = sa.text("INSERT INTO pipelining_probe (id) VALUES (:id)")
INSERT_LATER = write_behind(sa.text("INSERT INTO pipelining_probe (id) VALUES (:id)"))
UPDATE_LATER = write_behind(sa.text("UPDATE pipelining_probe SET id = :to WHERE id = :id"))
COUNT = sa.text("SELECT count(*) FROM pipelining_probe")
IDS = sa.text("SELECT id FROM pipelining_probe ORDER BY id")


@contextlib.asynccontextmanager
async def _engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE pipelining_probe (id INTEGER PRIMARY KEY)"))
        yield engine
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.text("DROP TABLE pipelining_probe"))
        await engine.dispose()


async def _ids(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return [row[0] for row in await conn.execute(IDS)]


async def test_queued_writes_commit_in_order_and_later_statements_see_them(
    database_url: str,
) -> None:
    async with _engine(database_url) as engine:
        async with engine.begin() as conn:
            await conn.execute(INSERT_LATER, {"id": 1})
            await conn.execute(UPDATE_LATER, {"id": 1, "to": 2})  # after the INSERT
            assert (await conn.execute(COUNT)).scalar_one() == 1  # sees both
            await conn.execute(INSERT_LATER, {"id": 3})
            await conn.execute(INSERT_LATER, [{"id": 4}, {"id": 5}])  # executemany
        assert await _ids(engine) == [2, 3, 4, 5]


async def test_a_rolled_back_transaction_leaves_nothing_sent_or_queued(database_url: str) -> None:
    """psycopg runs in autocommit here: only the BEGIN sent with the first statement
    makes these statements one transaction that can roll back."""
    async with _engine(database_url) as engine:
        async with engine.connect() as conn:
            await conn.begin()
            await conn.execute(INSERT, {"id": 1})
            await conn.execute(INSERT_LATER, {"id": 2})
            assert (await conn.execute(COUNT)).scalar_one() == 2
            await conn.execute(INSERT_LATER, {"id": 3})  # still queued
            await conn.rollback()
        assert await _ids(engine) == []
        async with engine.begin() as conn:  # the connection is clean for the next one
            await conn.execute(INSERT, {"id": 7})
        assert await _ids(engine) == [7]


async def test_a_failed_queued_write_fails_its_commit_and_nothing_commits(
    database_url: str,
) -> None:
    async with _engine(database_url) as engine:
        async with engine.begin() as conn:
            await conn.execute(INSERT, {"id": 1})

        async def duplicate_then_more() -> None:
            async with engine.begin() as conn:
                await conn.execute(INSERT, {"id": 2})  # sent, in the transaction
                await conn.execute(INSERT_LATER, {"id": 1})  # a duplicate: fails
                await conn.execute(INSERT_LATER, {"id": 3})  # after it: skipped

        async def duplicate_then_read() -> None:
            async with engine.begin() as conn:
                await conn.execute(INSERT_LATER, {"id": 1})
                await conn.execute(COUNT)  # raises the INSERT's error

        with pytest.raises(IntegrityError):  # at the INSERT on SQLite, at COMMIT here
            await duplicate_then_more()
        assert await _ids(engine) == [1]
        with pytest.raises(IntegrityError):
            await duplicate_then_read()
        assert await _ids(engine) == [1]


async def test_read_only_connections_run_each_statement_on_its_own(postgres_url: str) -> None:
    """AUTOCOMMIT (reading.py) gets no BEGIN: a write there is not rolled back."""
    async with _engine(postgres_url) as engine:
        async with engine.connect() as plain:
            conn = await without_writer_lock(plain)
            await conn.execute(INSERT_LATER, {"id": 1})  # at once: no transaction to join
            await conn.rollback()
        assert await _ids(engine) == [1]
        async with engine.begin() as conn:  # back to transactions on the same connection
            await conn.execute(INSERT, {"id": 2})
            await conn.rollback()
        assert await _ids(engine) == [1]


@contextlib.contextmanager
def _traced(driver: Any) -> Iterator[list[str]]:
    """libpq's protocol trace of this connection: the messages the client sent."""
    sent: list[str] = []
    with tempfile.TemporaryFile("w+") as trace:
        driver.pgconn.trace(trace.fileno())
        try:
            yield sent
        finally:
            driver.pgconn.untrace()
            trace.seek(0)
            for line in trace:
                fields = line.rstrip("\n").split("\t")
                if fields[1] == "F":
                    sent.append(fields[3])


def _round_trips(sent: list[str]) -> int:
    """Each Sync (extended protocol) or Query (simple) is one wait for the server (psycopg
    follows a pipeline's Sync with a Flush: the same wait)."""
    return sum(message in ("Sync", "Query") for message in sent)


async def _driver(conn: AsyncConnection) -> Any:
    return (await conn.get_raw_connection()).driver_connection


async def test_a_write_transaction_waits_once_per_answer_it_reads(postgres_url: str) -> None:
    async with _engine(postgres_url) as engine, engine.connect() as conn:
        driver = await _driver(conn)
        with _traced(driver) as sent:
            await conn.begin()
            await conn.execute(INSERT_LATER, {"id": 1})
            assert (await conn.execute(COUNT)).scalar_one() == 1  # BEGIN, INSERT, SELECT
            await conn.execute(INSERT_LATER, {"id": 2})
            await conn.execute(UPDATE_LATER, {"id": 2, "to": 3})
            await conn.commit()  # the INSERT, the UPDATE, COMMIT
        assert _round_trips(sent) == 2, " ".join(sent)
        assert sent.count("Parse") == 6  # BEGIN, 4 statements, COMMIT: all of them sent
        with _traced(driver) as sent:
            await conn.begin()
            await conn.execute(INSERT_LATER, {"id": 4})
            await conn.commit()  # BEGIN, INSERT, COMMIT
            await conn.begin()
            await conn.commit()  # nothing executed: nothing sent
        assert _round_trips(sent) == 1, sent
        assert await _ids(engine) == [1, 3, 4]


async def test_a_stalled_transaction_is_still_ended_by_the_server(postgres_url: str) -> None:
    """The engine's idle_in_transaction_session_timeout must hold after a pipelined
    exchange: PostgreSQL arms it only when it answers a Sync, and a Flush after it (as
    psycopg sends when it leaves pipeline mode) disarms it. Stalled after a queued
    write and a read, the transaction is ended, and its rows never commit."""
    async with _engine(postgres_url) as engine:
        stalling = make_engine(postgres_url, timeouts=Timeouts(statement=0.5))
        try:
            async with stalling.connect() as conn:
                await conn.begin()
                await conn.execute(INSERT_LATER, {"id": 1})
                pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
                await conn.execute(INSERT_LATER, {"id": 2})  # queued: never sent
                assert await _ended(engine, pid), "still open after 10 s"  # it stalls
                await conn.invalidate()
        finally:
            await stalling.dispose()
        assert await _ids(engine) == []


async def _ended(engine: AsyncEngine, pid: int) -> bool:
    """Whether the session is gone within 10 s (checked every 50 ms)."""
    for _ in range(200):
        async with engine.connect() as monitor:
            alive = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            if not (await monitor.execute(alive, {"pid": pid})).scalar_one():
                return True
        await asyncio.sleep(0.05)
    return False
