"""The hot path's writes on PostgreSQL through psycopg itself, past SQLAlchemy (issue 12).

A Charge's writes went through SQLAlchemy's execution layers one statement at a time: an
execution context, parameter construction, result set-up and greenlet switches into
psycopg, ~20 % of a Charge's server CPU in the 16:36 UTC profile (bench/README.md). Here
the statement is SQLAlchemy's own, compiled once per set of parameter names for psycopg
(the SQL SQLAlchemy would send, casts included), with SQLAlchemy's parameter conversion (a
TypeDecorator's `process_bind_param`; a type SQLAlchemy's psycopg dialect converts
otherwise is refused), sent through the transaction's own PipelinedConnection:

- `first` / `rowcount`: sent now (with what is queued ahead of it, pipelining.py), the
  RETURNING row or the row count read back;
- `write_behind`: queued, sent with the next statement that waits for an answer or with
  the COMMIT, as pipelining.write_behind does through SQLAlchemy.

psycopg's errors are raised as SQLAlchemy's, a lost connection invalidated, as SQLAlchemy
does (the unit of work maps them). Not for a traced engine, whose every statement must
reach SQLAlchemy's engine events (the OTel instrumentation): SqlUnitOfWorkFactory gives a
repository no `DirectConnection` then, nor on SQLite, and the statements go through
SQLAlchemy as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import psycopg as sa_psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.adapters.db.pipelining import PipelinedConnection
from payment_grpc.adapters.db.reading import pooled_connection

_PSYCOPG = sa_psycopg.dialect()  # type: ignore[no-untyped-call]
Processors = tuple[tuple[str, Callable[[Any, Any], Any]], ...]


class DirectConnection:
    """A unit of work's connection, for DirectWrite: its PipelinedConnection, looked up
    once (None: not one of pipelining's, so SQLAlchemy's path)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._driver: PipelinedConnection | None = None
        self._looked_up = False

    async def driver(self) -> PipelinedConnection | None:
        if not self._looked_up:
            driver = (await pooled_connection(self.conn)).driver_connection
            self._driver = driver if isinstance(driver, PipelinedConnection) else None
            self._looked_up = True
        return self._driver


class DirectWrite:
    """One INSERT / UPDATE, sent through psycopg on a DirectConnection (else through
    SQLAlchemy on `conn`)."""

    def __init__(self, statement: sa.UpdateBase) -> None:
        self.statement = statement
        # parameter names -> (SQL, conversions), as SQLAlchemy compiles per name set
        self._compiled: dict[frozenset[str], tuple[str, Processors]] = {}

    def _bound(self, parameters: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
        keys = frozenset(parameters)
        found = self._compiled.get(keys)
        if found is None:
            compiled = self.statement.compile(dialect=_PSYCOPG, column_keys=sorted(keys))
            missing = set(compiled.binds) - keys
            if missing:  # SQLAlchemy would send NULL; a direct write must name every one
                raise KeyError(f"parameters missing: {sorted(missing)}")
            processors = tuple(
                (name, process)
                for name, bind in compiled.binds.items()
                if (process := _bind_value(name, bind.type)) is not None
            )
            found = self._compiled[keys] = (compiled.string, processors)
        sql, processors = found
        if processors:
            parameters = dict(parameters)
            for name, process in processors:
                parameters[name] = process(parameters[name], _PSYCOPG)
        return sql, parameters

    async def first(
        self, conn: AsyncConnection, direct: DirectConnection | None, parameters: Mapping[str, Any]
    ) -> tuple[Any, ...] | None:
        """The first RETURNING row, or None."""
        driver = await direct.driver() if direct is not None else None
        if driver is None:
            result = await conn.execute(self.statement, parameters)
            row = result.first()
            return None if row is None else tuple(row)
        cursor = await self._send(conn, driver, parameters)
        return cast(tuple[Any, ...] | None, await cursor.fetchone())

    async def rowcount(
        self, conn: AsyncConnection, direct: DirectConnection | None, parameters: Mapping[str, Any]
    ) -> int:
        """How many rows it changed."""
        driver = await direct.driver() if direct is not None else None
        if driver is None:
            return (await conn.execute(self.statement, parameters)).rowcount
        return (await self._send(conn, driver, parameters)).rowcount

    async def write_behind(
        self, conn: AsyncConnection, direct: DirectConnection | None, parameters: Mapping[str, Any]
    ) -> None:
        """Queued: sent with the next statement that waits for an answer, or with the
        COMMIT (pipelining.py). Only for a statement whose result nobody reads; its error
        is raised by the statement or the COMMIT it travels with. Outside a transaction
        it is sent at once. Through SQLAlchemy, `statement` must be marked write_behind
        itself for the same."""
        driver = await direct.driver() if direct is not None else None
        if driver is None:
            await conn.execute(self.statement, parameters)
            return
        if driver.in_transaction:
            sql, bound = self._bound(parameters)
            driver.queue(sql, bound, many=False)
            return
        await self._send(conn, driver, parameters)

    async def _send(
        self, conn: AsyncConnection, driver: PipelinedConnection, parameters: Mapping[str, Any]
    ) -> psycopg.AsyncCursor[Any]:
        sql, bound = self._bound(parameters)
        try:
            return await driver.execute(sql, bound)
        except psycopg.Error as exc:
            disconnect = conn.dialect.is_disconnect(cast(Any, exc), None, None)
            if disconnect:
                await conn.invalidate()
            raise DBAPIError.instance(
                sql, bound, exc, psycopg.Error, connection_invalidated=disconnect
            ) from exc


def _bind_value(name: str, column_type: sa.types.TypeEngine[Any]) -> Any:
    """What SQLAlchemy does to a parameter for psycopg: a TypeDecorator's
    `process_bind_param`, or nothing; any other conversion is refused."""
    decorator = column_type if isinstance(column_type, sa.types.TypeDecorator) else None
    impl = column_type if decorator is None else decorator.impl_instance
    if impl.dialect_impl(_PSYCOPG).bind_processor(_PSYCOPG) is not None:
        raise TypeError(f"parameter {name}: its type converts values")
    return None if decorator is None else decorator.process_bind_param
