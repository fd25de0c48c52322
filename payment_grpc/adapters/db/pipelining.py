"""PostgreSQL transactions in as few round trips as their answers allow (issue 12).

psycopg sends BEGIN by itself before a transaction's first statement and waits for its
answer: a round trip per transaction for nothing. And a statement whose answer nobody
reads (an event's INSERT, an idempotency key's checkpoint, the feed and outbox rows) waited
for its answer before the next one was sent. Here psycopg's connection is in autocommit
mode (psycopg sends no BEGIN of its own) and:

- BEGIN is queued when SQLAlchemy begins a transaction (`begin_later`), and goes out with
  the transaction's first statement: BEGIN, the statement and a Sync in one pipeline;
- a statement marked `write_behind` is queued too, and goes out, in order, with the next
  statement that needs its answer, or with the COMMIT;
- COMMIT sends what is queued and COMMIT in one pipeline; a transaction that sent nothing
  ends without a round trip.

Every statement still reaches PostgreSQL in the order it was executed, in its transaction:
a statement sees every queued write executed before it. What moves is where an error is
raised: a queued statement's error (a constraint, a lock timeout) is raised by the
statement it travels with, or by the COMMIT, and the transaction is rolled back as usual.
PostgreSQL skips every message after an error up to the pipeline's Sync, the COMMIT
included, so nothing after a failed statement ever commits. Hence only statements whose
result nobody checks may be `write_behind`: never one whose row count or RETURNING
decides what happens next (the payment's versioned UPDATE, an INSERT ... ON CONFLICT DO
NOTHING RETURNING); those are sent at once, with what is queued ahead of them.

A connection that SQLAlchemy uses with isolation_level AUTOCOMMIT, or marked
NO_TRANSACTION (reading.py's read-only transactions), gets no BEGIN: each statement on its
own, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any, TypeVar, cast

import psycopg
import sqlalchemy as sa
from psycopg import AsyncPipeline
from psycopg.abc import Params
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from payment_grpc.adapters.bus.postgres import libpq_dsn

WRITE_BEHIND = "payment_grpc_write_behind"  # the execution option that marks a statement
# The execution option of a connection that begins no transaction (reading.py's read-only
# work): psycopg is in autocommit mode already, so no isolation level is set at checkout
# and reset at check-in for it (SQLAlchemy's AUTOCOMMIT costs two driver calls each way).
NO_TRANSACTION = "payment_grpc_no_transaction"

E = TypeVar("E", bound=sa.sql.Executable)
_IDLE = psycopg.pq.TransactionStatus.IDLE


def write_behind(statement: E) -> E:
    """`statement`, executed with the next statement that needs an answer or with the
    COMMIT (PostgreSQL; at once on SQLite). Only for a statement whose result nobody
    reads: its error, if any, is raised by the statement or the COMMIT it travels with."""
    return statement.execution_options(**{WRITE_BEHIND: True})


class PipelinedConnection(psycopg.AsyncConnection[Any]):
    """A psycopg connection (autocommit for psycopg) whose transactions SQLAlchemy begins
    with `begin_later` and whose queued statements go out with the next one that waits.

    Once a transaction sends something, the connection stays in pipeline mode until its
    COMMIT or ROLLBACK, and every exchange inside it ends with a Sync: PostgreSQL arms
    idle_in_transaction_session_timeout (engine.py) only when it answers a Sync, and
    psycopg's way out of pipeline mode sends a Flush after its Sync, which disarms it.
    A transaction stalled after such an exchange would then hold the change feed back
    for as long as it stalls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (query, its parameters, executemany); queries as SQLAlchemy compiled them
        self._queued: list[tuple[Any, Params | Sequence[Params] | None, bool]] = []
        self._began = False  # BEGIN queued, not sent yet
        self._write_behind = False  # the next statement executed is queued
        self._mode: AbstractAsyncContextManager[AsyncPipeline] | None = None
        self._pipe: AsyncPipeline | None = None  # pipeline mode of this transaction

    def begin_later(self) -> None:
        """A transaction begins: BEGIN goes out with its first statement."""
        self._queued.clear()
        self._queued.append(("BEGIN", None, False))
        self._began = True

    @property
    def in_transaction(self) -> bool:
        """A transaction is under way (begun, or BEGIN queued)."""
        return self._began or self.info.transaction_status != _IDLE

    def write_behind_next(self) -> None:
        """The next statement executed is queued (see `write_behind`), if a transaction
        is under way: in autocommit it runs at once."""
        if self.in_transaction:
            self._write_behind = True

    def queue(self, query: Any, params: Params | Sequence[Params] | None, many: bool) -> None:
        """Send `query` (psycopg's own SQL and parameters) with the next statement that
        needs an answer, or with the COMMIT."""
        self._queued.append((query, params, many))

    def _takes_write_behind(self) -> bool:
        taken, self._write_behind = self._write_behind, False
        return taken

    @property
    def pipelined(self) -> bool:
        """Something waits to go out, or the transaction is in pipeline mode."""
        return bool(self._queued) or self._pipe is not None

    async def _send_queued(self) -> AsyncPipeline:
        """In this transaction's pipeline (entered now if need be), what is queued, in
        order; nothing waits for an answer yet."""
        if self._pipe is None:
            mode = self.pipeline()
            self._pipe = await mode.__aenter__()
            self._mode = mode
        queued, self._queued = self._queued, []
        self._began = False
        for query, params, many in queued:
            cursor = psycopg.AsyncCursor(self)
            if many:
                await cursor.executemany(query, cast(Sequence[Params], params))
            else:
                await cursor.execute(query, cast(Params | None, params))
        return self._pipe

    async def _leave_pipeline(self) -> None:
        """Out of pipeline mode: a Sync, every answer read; the first error raised."""
        mode, self._mode, self._pipe = self._mode, None, None
        if mode is not None:
            await mode.__aexit__(None, None, None)

    async def close(self) -> None:
        """Closed first, then out of pipeline mode, which fails at once on a closed
        connection: nothing waits, and no pipeline is left for the garbage collector to
        end (psycopg would log a warning then)."""
        await super().close()
        self._queued.clear()
        with suppress(psycopg.Error):
            await self._leave_pipeline()

    async def commit(self) -> None:
        if self._began and len(self._queued) == 1:  # nothing was sent: nothing to end
            self._queued.clear()
            self._began = False
            return
        if not self.pipelined:
            await super().commit()
            return
        # After a failed statement PostgreSQL skips the rest up to the Sync: no COMMIT.
        await self._send_queued()
        await psycopg.AsyncCursor(self).execute("COMMIT")
        await self._leave_pipeline()

    async def rollback(self) -> None:
        self._queued.clear()
        self._began = False
        self._write_behind = False
        if self._pipeline is None and self.pgconn.transaction_status == _IDLE:
            return  # nothing began (a read-only connection's check-in): what psycopg does
        # A queued statement's error is what the rollback undoes anyway; a connection
        # that is gone fails the ROLLBACK below.
        with suppress(psycopg.Error):
            await self._leave_pipeline()
        await super().rollback()


class PipelinedCursor(psycopg.AsyncCursor[Any]):
    """Sends its connection's queued statements with its own, in one pipeline."""

    async def execute(
        self,
        query: Any,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> PipelinedCursor:
        conn = self.connection
        if not isinstance(conn, PipelinedConnection):
            await super().execute(query, params, prepare=prepare, binary=binary)
            return self
        if conn._takes_write_behind():
            conn._queued.append((query, params, False))
            return self
        if not conn.pipelined:
            await super().execute(query, params, prepare=prepare, binary=binary)
            return self
        pipe = await conn._send_queued()
        await super().execute(query, params, prepare=prepare, binary=binary)
        await pipe.sync()  # this statement's answer (and the first error before it)
        return self

    async def executemany(
        self, query: Any, params_seq: Iterable[Params], *, returning: bool = False
    ) -> None:
        conn = self.connection
        if not isinstance(conn, PipelinedConnection):
            await super().executemany(query, params_seq, returning=returning)
            return
        if conn._takes_write_behind() and not returning:
            conn._queued.append((query, list(params_seq), True))
            return
        if not conn.pipelined:
            await super().executemany(query, params_seq, returning=returning)
            return
        pipe = await conn._send_queued()
        await super().executemany(query, params_seq, returning=returning)
        await pipe.sync()


def pipelined_engine(url: str, options: str, **kwargs: Any) -> AsyncEngine:
    """A PostgreSQL engine whose connections are PipelinedConnections: SQLAlchemy's
    isolation level AUTOCOMMIT (psycopg sends no BEGIN), BEGIN queued by the "begin"
    event, statements marked `write_behind` queued by "before_cursor_execute"."""
    dsn = libpq_dsn(url)

    async def connect() -> PipelinedConnection:
        return await PipelinedConnection.connect(
            dsn, options=options, autocommit=True, cursor_factory=PipelinedCursor
        )

    engine = create_async_engine(url, async_creator=connect, isolation_level="AUTOCOMMIT", **kwargs)
    sa.event.listen(engine.sync_engine, "begin", _begin_later)
    sa.event.listen(engine.sync_engine, "before_cursor_execute", _maybe_write_behind)
    return engine


def is_pipelined(engine: AsyncEngine) -> bool:
    """`engine` was made by `pipelined_engine`."""
    return sa.event.contains(engine.sync_engine, "begin", _begin_later)


def _driver(conn: sa.Connection) -> PipelinedConnection | None:
    driver = conn.connection.driver_connection
    return driver if isinstance(driver, PipelinedConnection) else None


def _begin_later(conn: sa.Connection) -> None:
    # Asked for AUTOCOMMIT or no transaction on this connection (read-only work): none.
    options = conn.get_execution_options()
    if options.get(NO_TRANSACTION) or options.get("isolation_level") == "AUTOCOMMIT":
        return
    if (driver := _driver(conn)) is not None:
        driver.begin_later()


def _maybe_write_behind(
    conn: sa.Connection,
    _cursor: Any,
    _statement: str,
    _parameters: Any,
    context: Any,
    _executemany: bool,
) -> None:
    if context is None or not context.execution_options.get(WRITE_BEHIND):
        return
    compiled = context.compiled
    if compiled is not None and compiled.effective_returning:
        return  # SQLAlchemy reads rows back (a generated primary key): sent at once
    if (driver := _driver(conn)) is not None:
        driver.write_behind_next()
