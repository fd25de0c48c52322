"""Looking into (and arranging) the database behind a running Application."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa

from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.adapters.db.tables import idempotency_keys, payment_events, payments, refunds
from payment_grpc.api.responses import OPERATIONS
from payment_grpc.bootstrap import Application, build_cipher
from payment_grpc.service.ports import KeyRecord, Operation, RecoveryPoint


@contextmanager
def engine_events(
    app: Application, listeners: Sequence[tuple[str, Callable[..., Any]]]
) -> Iterator[None]:
    """`listeners` ((SQLAlchemy engine event, function)) on the app's engine while inside."""
    engine = app.engine.sync_engine
    for name, listener in listeners:
        sa.event.listen(engine, name, listener)
    try:
        yield
    finally:
        for name, listener in listeners:
            sa.event.remove(engine, name, listener)


@contextmanager
def committed_transactions(app: Application) -> Iterator[list[list[str]]]:
    """The statements of every transaction that commits while inside, in the order they
    reach the database (whitespace collapsed, upper case). On PostgreSQL they are read
    where psycopg sends them (its cursors' execute, which the pipelined connection's
    queued statements, its COMMIT and the writes past SQLAlchemy go through too: the
    engine's events do not see those); on SQLite from SQLAlchemy's engine events."""
    running: dict[int, list[str]] = {}
    committed: list[list[str]] = []

    def seen(connection: int, text: str) -> None:
        statement = " ".join(text.split()).upper()
        if statement == "BEGIN":  # also after a ROLLBACK, which is no cursor statement
            running[connection] = []
        running.setdefault(connection, []).append(statement)
        if statement == "COMMIT":
            committed.append(running.pop(connection)[:-1])

    if app.engine.dialect.name != "postgresql":

        def statement(conn: Any, _cursor: Any, text: str, *_args: Any) -> None:
            seen(id(conn), text)

        listeners: list[tuple[str, Callable[..., Any]]] = [
            ("before_cursor_execute", statement),
            ("commit", lambda conn: committed.append(running.pop(id(conn), []))),
            ("rollback", lambda conn: running.pop(id(conn), None)),
        ]
        with engine_events(app, listeners):
            yield committed
        return

    execute = psycopg.AsyncCursor.execute

    async def sent(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        text = query if isinstance(query, str) else query.as_string(self.connection)
        seen(id(self.connection), text)
        return await execute(self, query, *args, **kwargs)

    psycopg.AsyncCursor.execute = sent  # type: ignore[method-assign]
    try:
        yield committed
    finally:
        psycopg.AsyncCursor.execute = execute  # type: ignore[method-assign]


def inserts_into(statements: list[str], table: str) -> bool:
    """One of a transaction's `statements` (from committed_transactions) inserts into
    `table`."""
    return any(s.startswith(f"INSERT INTO {table.upper()} ") for s in statements)


def ledger_entries(app: Application, kind: str) -> int:
    """How many `kind` entries (authorize, capture, void, refund) the simulated gateway's
    ledger holds: what reached the gateway."""
    with sqlite3.connect(app.settings.ledger_path()) as ledger:
        found = ledger.execute("SELECT COUNT(*) FROM ledger WHERE kind = ?", (kind,))
        return int(found.fetchone()[0])


async def row_counts(app: Application) -> dict[str, int]:
    async with app.engine.connect() as conn:
        return {
            table.name: (
                await conn.execute(sa.select(sa.func.count()).select_from(table))
            ).scalar_one()
            for table in (payments, payment_events, refunds)
        }


async def events_of(app: Application, payment_id: str) -> list[tuple[int, str | None, str]]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(
                payment_events.c.sequence, payment_events.c.previous_status, payment_events.c.status
            )
            .where(payment_events.c.payment_id == payment_id)
            .order_by(payment_events.c.sequence)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def expire_idempotency_keys(app: Application) -> None:
    """Push every stored key past its retention, as if 72 h had gone by. The rows are
    rewritten behind the process's back, so the final answers it keeps (which only its
    clock expires) are forgotten too."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    async with app.engine.begin() as conn:
        await conn.execute(idempotency_keys.update().values(expires_at=past))
    app.keys.answers.clear()


def operation_of(rpc: str) -> Operation:
    """The keyed operation an RPC of PaymentService (by its name) runs."""
    return OPERATIONS[f"/payments.v1.PaymentService/{rpc}"]


async def stored_key(
    app: Application, rpc: str, key: str, subject: str = "svc-tests"
) -> KeyRecord | None:
    """The key's record read through the real repository (its answer decrypted)."""
    uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))
    async with uow(read_only=True) as tx:
        return await tx.idempotency.get_for_update(subject, operation_of(rpc), key)


async def abandon_key(
    app: Application, rpc: str, key: str, point: RecoveryPoint, *, locked_at: datetime
) -> None:
    """Put a finished key back where a crash would have left it: its answer not yet
    stored, held by a replica that stopped at `locked_at`. The process's kept final
    answers are forgotten too (the crashed execution never committed one)."""
    async with app.engine.begin() as conn:
        await conn.execute(
            idempotency_keys.update()
            .where(
                idempotency_keys.c.operation == operation_of(rpc).value,
                idempotency_keys.c.key == key,
            )
            .values(
                recovery_point=point.value,
                response_code=None,
                response_body=None,
                locked_by="replica-gone",
                locked_at=locked_at,
            )
        )
    app.keys.answers.clear()


async def insert_pending_refund(
    app: Application, payment_id: str, amount_minor: int, *, updated_at: datetime
) -> str:
    """A refund row left PENDING (the gateway never answered), for the recovery worker."""
    refund_id = f"re_{uuid.uuid4().hex}"
    async with app.engine.begin() as conn:
        await conn.execute(
            refunds.insert().values(
                id=refund_id,
                payment_id=payment_id,
                currency="USD",
                amount_minor=amount_minor,
                status="PENDING",
                reason="UNSPECIFIED",
                gateway_reference="",
                failure_code="",
                created_at=updated_at,
                updated_at=updated_at,
            )
        )
    return refund_id


async def refund_status(app: Application, refund_id: str) -> str:
    async with app.engine.connect() as conn:
        query = sa.select(refunds.c.status).where(refunds.c.id == refund_id)
        return str((await conn.execute(query)).scalar_one())
