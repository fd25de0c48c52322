"""Engine and unit of work for SQLite (embedded) and PostgreSQL (production).

SQLite has no row locks: a writing transaction starts with BEGIN IMMEDIATE, which takes
the database's single writer lock up front, so read-check-write sequences serialize the
way SELECT ... FOR UPDATE makes them on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from payment_grpc.adapters.db.crypto import FieldCipher
from payment_grpc.adapters.db.idempotency import SqlIdempotencyRepository
from payment_grpc.adapters.db.repositories import SqlPaymentRepository, SqlRefundRepository
from payment_grpc.service.errors import StorageUnavailable

SQLITE_BUSY_TIMEOUT_S = 30


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    if is_sqlite(url):
        return _sqlite_engine(url)
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_timeout=10
    )


def _sqlite_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class SqlUnitOfWork:
    def __init__(self, conn: AsyncConnection, row_locks: bool, cipher: FieldCipher) -> None:
        self._conn = conn
        self.payments = SqlPaymentRepository(conn, row_locks, cipher)
        self.refunds = SqlRefundRepository(conn)
        self.idempotency = SqlIdempotencyRepository(conn, row_locks, cipher)

    async def commit(self) -> None:
        await self._conn.commit()


class SqlUnitOfWorkFactory:
    def __init__(self, engine: AsyncEngine, cipher: FieldCipher) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._cipher = cipher  # encrypts sensitive columns (built once, shared)

    @asynccontextmanager
    async def __call__(self, *, read_only: bool = False) -> AsyncIterator[SqlUnitOfWork]:
        try:
            async with self._engine.connect() as conn:
                if self._sqlite and read_only:
                    conn = await conn.execution_options(sqlite_begin="DEFERRED")
                await conn.begin()
                yield SqlUnitOfWork(conn, row_locks=not self._sqlite, cipher=self._cipher)
        except (OperationalError, DBAPIError) as exc:
            if _is_connection_problem(exc):
                raise StorageUnavailable("the database is unavailable") from exc
            raise


def _is_connection_problem(exc: DBAPIError) -> bool:
    return exc.connection_invalidated or isinstance(exc, OperationalError)


async def ping(engine: AsyncEngine) -> bool:
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception:
        return False
    return True
