"""Read-only connections: no writer lock on SQLite, no transaction round trips on PostgreSQL.

Its own module so that every adapter can use it, the outbox included (engine.py imports
the outbox through the event log).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import psycopg as sa_psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection

from payment_grpc.adapters.db.pipelining import NO_TRANSACTION, PipelinedConnection, is_pipelined

_PSYCOPG = sa_psycopg.dialect()  # type: ignore[no-untyped-call]


async def without_writer_lock(conn: AsyncConnection) -> AsyncConnection:
    """For a read-only transaction: on SQLite it begins DEFERRED, taking no writer lock; on
    PostgreSQL each statement runs on its own (autocommit: no BEGIN and ROLLBACK round
    trips; under READ COMMITTED every statement had its own snapshot anyway)."""
    if conn.dialect.name == "sqlite":
        return await conn.execution_options(sqlite_begin="DEFERRED")
    raw = await conn.get_raw_connection()
    if isinstance(raw.driver_connection, PipelinedConnection):  # autocommit for psycopg
        return await conn.execution_options(**{NO_TRANSACTION: True})
    return await conn.execution_options(isolation_level="AUTOCOMMIT")


def read_only_engine(engine: AsyncEngine) -> AsyncEngine:
    """`engine` (same pool, same events) whose connections are set up as
    `without_writer_lock` sets one up, from the start: no per-checkout call into the
    connection (a greenlet round trip through SQLAlchemy each). For the unit of work's
    read-only transactions (issue 12: GetPayment)."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin="DEFERRED")
    if is_pipelined(engine):
        return engine.execution_options(**{NO_TRANSACTION: True})
    return engine.execution_options(isolation_level="AUTOCOMMIT")


class DirectRow:
    """One table's single-row SELECT sent through psycopg itself, past SQLAlchemy's
    execution and result layers, on a PostgreSQL connection that begins no transaction
    (`without_writer_lock`).

    Through SQLAlchemy the read of one payment row cost ~0.8 ms of CPU, the same SELECT
    through psycopg ~0.1 ms (bench/README.md): SQLAlchemy's execution context, its
    result metadata from `cursor.description` (a psycopg Column object per column, built
    per read) and a greenlet switch per await. The statement is SQLAlchemy's own,
    compiled once for psycopg; the row is handed back as the mapping SQLAlchemy would
    give, column by column (SQLAlchemy's psycopg dialect converts none of these types:
    strings, integers and timestamptz come as psycopg decodes them, a TypeDecorator's
    `process_result_value` is applied; a type SQLAlchemy converts otherwise is refused).
    Not for a statement whose span is wanted: SQLAlchemy's engine events (the OTel
    instrumentation) do not see it."""

    def __init__(self, select: sa.Select[Any]) -> None:
        columns = select.selected_columns
        self._sql = str(select.compile(dialect=_PSYCOPG))
        self._names = tuple(column.name for column in columns)
        self._processors = tuple(
            (i, process)
            for i, column in enumerate(columns)
            if (process := _result_value(column.name, column.type)) is not None
        )

    async def first(
        self, conn: AsyncConnection, parameters: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The first row, by column name, or None. psycopg's errors are raised as
        SQLAlchemy's, a lost connection invalidated, as SQLAlchemy does."""
        pooled = await pooled_connection(conn)
        driver = cast(psycopg.AsyncConnection[Any], pooled.driver_connection)
        try:
            cursor = await driver.execute(self._sql, parameters)
            row = await cursor.fetchone()
        except psycopg.Error as exc:
            disconnect = conn.dialect.is_disconnect(cast(Any, exc), None, None)
            if disconnect:
                await conn.invalidate()
            raise DBAPIError.instance(
                self._sql, parameters, exc, psycopg.Error, connection_invalidated=disconnect
            ) from exc
        if row is None:
            return None
        values = list(row)
        for i, process in self._processors:
            values[i] = process(values[i], _PSYCOPG)
        return dict(zip(self._names, values, strict=True))


async def pooled_connection(conn: AsyncConnection) -> PoolProxiedConnection:
    """The pooled connection `conn` holds: without a greenlet round trip while it holds
    one (SQLAlchemy's `get_raw_connection` spawns one to read the same attribute)."""
    sync = conn.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        return sync.connection  # checked out and valid: a plain attribute
    return await conn.get_raw_connection()  # reconnects (pool I/O) or raises


def _result_value(name: str, column_type: sa.types.TypeEngine[Any]) -> Any:
    """What SQLAlchemy does to a column's values from psycopg: a TypeDecorator's
    `process_result_value`, or nothing; any other conversion is refused."""
    decorator = column_type if isinstance(column_type, sa.types.TypeDecorator) else None
    impl = column_type if decorator is None else decorator.impl_instance
    if impl.dialect_impl(_PSYCOPG).result_processor(_PSYCOPG, None) is not None:
        raise TypeError(f"column {name}: its type converts results")
    return None if decorator is None else decorator.process_result_value
