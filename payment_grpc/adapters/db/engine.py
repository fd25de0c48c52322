"""Engine and unit of work for SQLite (embedded) and PostgreSQL (production).

SQLite has no row locks: a writing transaction starts with BEGIN IMMEDIATE, which takes
the database's single writer lock up front, so read-check-write sequences serialize the
way SELECT ... FOR UPDATE makes them on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from payment_grpc.adapters.db.crypto import FieldCipher
from payment_grpc.adapters.db.event_log import EventLog
from payment_grpc.adapters.db.gateway_events import SqlGatewayEventRepository
from payment_grpc.adapters.db.idempotency import SqlIdempotencyRepository
from payment_grpc.adapters.db.pipelining import pipelined_engine
from payment_grpc.adapters.db.reading import read_only_engine
from payment_grpc.adapters.db.repositories import (
    SqlPaymentRepository,
    SqlRefundRepository,
    Written,
)
from payment_grpc.adapters.db.sqlite_inline import InlineConnection, inline_connector
from payment_grpc.adapters.db.writing import DirectConnection
from payment_grpc.domain.payment import Payment, PaymentEvent
from payment_grpc.domain.refund import Refund
from payment_grpc.service.errors import StorageUnavailable
from payment_grpc.service.ports import ChargeRefusal, StatusBus
from payment_grpc.telemetry.metrics import REFUNDS, STATUS_CHANGES


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long one transaction may wait, in seconds (config: DB_*_TIMEOUT_SECONDS)."""

    lock: float = 2.0
    statement: float = 30.0
    pool: float = 5.0


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, pool_size: int = 10, timeouts: Timeouts = Timeouts()) -> AsyncEngine:
    if is_sqlite(url):
        return _sqlite_engine(url, timeouts)
    engine = pipelined_engine(
        url,
        postgres_options(timeouts),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=timeouts.pool,
    )
    sa.event.listen(engine.sync_engine, "checkout", _still_connected)
    return engine


def _still_connected(_dbapi_connection: Any, _record: Any, proxy: Any) -> None:
    """The pool's pre-ping without a round trip: a pooled connection that is idle has
    nothing to read, so a readable socket means the server closed it or sent an error (a
    restart, an idle timeout, a proxy gone): SQLAlchemy drops it and connects anew. A
    pre-ping query (`pool_pre_ping`) cost one round trip per transaction."""
    conn = proxy.driver_connection
    if conn.closed or conn.broken:
        raise DisconnectionError("the connection is closed")
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error) as exc:
        raise DisconnectionError("the connection's socket is gone") from exc
    if readable:
        raise DisconnectionError("the server hung up on an idle connection")


def postgres_options(timeouts: Timeouts) -> str:
    """Session settings: a lock or a statement that waits longer fails (SQLSTATE 55P03 /
    57014, an OperationalError mapped to StorageUnavailable below) instead of holding its
    pooled connection for as long as another transaction likes. A transaction that sends
    nothing for as long as a statement may run (a stalled task, a blocked event loop) is
    ended by the server: an open writing transaction holds the change feed back (feed.py),
    so none of ours can do that for longer."""
    lock_ms, statement_ms = round(timeouts.lock * 1000), round(timeouts.statement * 1000)
    return (
        f"-c lock_timeout={lock_ms} -c statement_timeout={statement_ms}"
        f" -c idle_in_transaction_session_timeout={statement_ms}"
    )


def _sqlite_engine(url: str, timeouts: Timeouts) -> AsyncEngine:
    # Statements run on the loop's thread, one writer at a time (sqlite_inline.py).
    engine = create_async_engine(
        url, pool_timeout=timeouts.pool, async_creator=inline_connector(url, timeouts.lock)
    )

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

    sa.event.listen(engine.sync_engine, "invalidate", _roll_back_before_closing)
    return engine


def _roll_back_before_closing(dbapi_connection: Any, _record: Any, _error: Any) -> None:
    """End the transaction of a connection SQLAlchemy is about to close because its call
    was cancelled mid-transaction (a deadline, a client gone).

    Closing alone did not always end it: sqlite3's close leaves a connection whose
    statements are still referenced (by the cut call's traceback, until the garbage
    collector runs) open as a "zombie", transaction and writer lock included, and every
    later write waited for the busy timeout and failed: test_interrupted_keys[sqlite] hung
    that way. ROLLBACK releases the lock whatever still references the statements.
    Outside the connection's own task (the garbage collector's clean-up) this cannot
    wait for the rollback; the close that follows is all there is, as before."""
    # Cancelled again meanwhile, or no task to wait in: the close follows either way, and
    # the call's own CancelledError is already on its way out.
    with contextlib.suppress(Exception, asyncio.CancelledError):
        driver = getattr(dbapi_connection, "driver_connection", None)
        if isinstance(driver, InlineConnection):
            driver.roll_back_now()  # no task needed: it runs on this thread
        else:
            dbapi_connection.rollback()


class SqlUnitOfWork:
    def __init__(
        self,
        conn: AsyncConnection,
        row_locks: bool,
        cipher: FieldCipher,
        event_log: EventLog | None = None,
        direct_reads: bool = False,
        direct_writes: bool = False,
    ) -> None:
        self._conn = conn
        direct = DirectConnection(conn) if direct_writes else None
        self.events: list[PaymentEvent] = []  # written in this transaction, in order
        self._changed: Written = []  # the same, with the payment each left behind
        self._event_log = event_log
        self.committed = False
        self._on_commit: list[Callable[[], None]] = []
        self._refusals: list[ChargeRefusal] = []  # outbox rows without a payment
        self.payments = SqlPaymentRepository(
            conn,
            row_locks,
            cipher,
            written=self.events,
            changed=self._changed,
            direct_reads=direct_reads,
            # The event log writes them with the feed rows, in one statement (PostgreSQL).
            events_with_commit=event_log is not None and conn.dialect.name == "postgresql",
            direct=direct,
        )
        self.refunds = SqlRefundRepository(conn)
        self.idempotency = SqlIdempotencyRepository(conn, row_locks, cipher, direct)
        self.gateway_events = SqlGatewayEventRepository(conn)

    def on_commit(self, action: Callable[[], None]) -> None:
        self._on_commit.append(action)

    def publish_refusal(self, refusal: ChargeRefusal) -> None:
        self._refusals.append(refusal)

    async def commit(self) -> None:
        # The one place where what a transaction's events imply is written with them: the
        # change feed and the transactional outbox rows, with the COMMIT.
        log = self._event_log
        wrote_outbox = False
        if log is None:
            await self._conn.commit()
        else:
            wrote_outbox = await log.write_and_commit(
                self._conn, self._changed, datetime.now(UTC), self._refusals
            )
        self.committed = True
        count_committed(self.payments.changed, self.refunds.changed)
        for action in self._on_commit:
            action()
        if wrote_outbox and log is not None:
            log.wake()  # the relay delivers now, not at its next poll


def count_committed(
    payments: Sequence[tuple[Payment, Sequence[PaymentEvent]]], refunds: Sequence[Refund]
) -> None:
    """payments.status_changes and payments.refunds for what this transaction committed."""
    for payment, events in payments:
        for event in events:
            STATUS_CHANGES.add(
                1,
                {
                    "payments.status": event.status.value,
                    "payments.method": payment.method.type.value,
                    "payments.currency": event.amount.currency,
                },
            )
    for refund in refunds:
        REFUNDS.add(
            1,
            {
                "payments.refund.status": refund.status.value,
                "payments.currency": refund.amount.currency,
            },
        )


class SqlUnitOfWorkFactory:
    def __init__(
        self,
        engine: AsyncEngine,
        cipher: FieldCipher,
        bus: StatusBus | None = None,
        event_log: EventLog | None = None,
        *,
        statement_spans: bool = False,
    ) -> None:
        """`bus` hears the events of every committed transaction (None: nobody listens,
        as for tools that only read); `event_log` writes their feed and outbox rows.
        `statement_spans`: the engine's statements are traced (trace_database), so every
        one goes through SQLAlchemy; else a read-only transaction on PostgreSQL reads a
        payment by id through psycopg directly (reading.DirectRow), and a writing one sends
        its hot writes that way (writing.DirectWrite)."""
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        # Read-only work: connections set up for it from the start (reading.py). On
        # PostgreSQL each of its statements runs on its own: nothing to begin or end.
        self._read_engine = read_only_engine(engine)
        # psycopg directly, past SQLAlchemy: reads in read-only units, hot writes in others.
        self._direct = engine.dialect.name == "postgresql" and not statement_spans
        self._cipher = cipher  # encrypts sensitive columns (built once, shared)
        self._bus = bus
        self._event_log = event_log

    @asynccontextmanager
    async def __call__(self, *, read_only: bool = False) -> AsyncIterator[SqlUnitOfWork]:
        uow: SqlUnitOfWork | None = None
        try:
            async with (self._read_engine if read_only else self._engine).connect() as conn:
                if self._sqlite or not read_only:
                    await conn.begin()
                uow = SqlUnitOfWork(
                    conn,
                    not self._sqlite,
                    cipher=self._cipher,
                    event_log=self._event_log,
                    direct_reads=read_only and self._direct,
                    direct_writes=not read_only and self._direct,
                )
                yield uow
        except PoolTimeout as exc:
            # Every pooled connection busy for pool_timeout: overloaded, not broken.
            raise StorageUnavailable("no database connection free in time") from exc
        except (OperationalError, DBAPIError) as exc:
            if _is_connection_problem(exc):
                raise StorageUnavailable("the database is unavailable") from exc
            raise
        finally:
            # After the connection is back in the pool: watchers re-read committed rows.
            if uow is not None and uow.committed:
                await self._announce(uow.events)

    async def _announce(self, events: list[PaymentEvent]) -> None:
        if self._bus is not None:
            for event in events:
                await self._bus.publish(event.payment_id, event.sequence)


def _is_connection_problem(exc: DBAPIError) -> bool:
    return exc.connection_invalidated or isinstance(exc, OperationalError)


async def ping(engine: AsyncEngine) -> bool:
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception:
        return False
    return True
