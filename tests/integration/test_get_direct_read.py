"""GetPayment's read on PostgreSQL past SQLAlchemy (reading.DirectRow, issue 12): a
read-only transaction gets the payment row through psycopg directly, unless the engine's
statements are traced. It must read what SQLAlchemy reads, value for value; each test runs
on SQLite too (SQLAlchemy's path there)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import ProgrammingError

from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.adapters.db.reading import DirectRow, without_writer_lock
from payment_grpc.adapters.db.tables import payments
from payment_grpc.bootstrap import Application, build_cipher
from payment_grpc.domain.errors import PaymentNotFound
from tests.helpers.builders import card, charge_request
from tests.helpers.db import engine_events

METADATA = {"cart": "42", "note": "ünïcode"}


@contextmanager
def _statements(app: Application) -> Iterator[list[str]]:
    """The statements SQLAlchemy's engine events see (what the OTel instrumentation sees)."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    with engine_events(app, [("before_cursor_execute", before)]):
        yield seen


async def test_a_read_only_get_reads_what_sqlalchemy_reads(app, stub) -> None:  # type: ignore[no-untyped-def]
    reply = await stub.Charge(charge_request(method=card("tok_visa"), metadata=METADATA))
    payment_id = reply.payment.payment_id
    uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))
    postgres = app.engine.dialect.name == "postgresql"
    with _statements(app) as seen:
        async with uow(read_only=True) as tx:
            read = await tx.payments.get(payment_id)
    assert bool(seen) is not postgres  # on PostgreSQL past SQLAlchemy's events
    async with uow() as tx:  # a writing transaction: SQLAlchemy's path on both
        assert await tx.payments.get(payment_id) == read
    assert read.payment_id == payment_id
    assert read.card is not None
    assert read.metadata == METADATA
    assert read.created_at.utcoffset() is not None

    with pytest.raises(PaymentNotFound):
        async with uow(read_only=True) as tx:
            await tx.payments.get("pay_nothing_here")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # psycopg only
async def test_the_direct_row_is_sqlalchemys_row(app, stub) -> None:  # type: ignore[no-untyped-def]
    reply = await stub.Charge(charge_request(method=card("tok_visa"), metadata=METADATA))
    select = sa.select(payments).where(payments.c.id == sa.bindparam("b_id"))
    async with app.engine.connect() as plain:
        conn = await without_writer_lock(plain)
        expected = (await conn.execute(select, {"b_id": reply.payment.payment_id})).mappings()
        want = dict(expected.one())
        got = await DirectRow(select).first(conn, {"b_id": reply.payment.payment_id})
        assert await DirectRow(select).first(conn, {"b_id": "nothing"}) is None
    assert got == want
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
    assert got["created_at"].tzinfo == want["created_at"].tzinfo


async def test_traced_statements_keep_going_through_sqlalchemy(app, stub) -> None:  # type: ignore[no-untyped-def]
    reply = await stub.Charge(charge_request())
    uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings), statement_spans=True)
    with _statements(app) as seen:
        async with uow(read_only=True) as tx:
            await tx.payments.get(reply.payment.payment_id)
    assert any(s.startswith("SELECT") and "FROM payments" in s for s in seen)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # psycopg only
async def test_a_database_error_is_sqlalchemys(app) -> None:  # type: ignore[no-untyped-def]
    missing = sa.table("no_such_table", sa.column("id")).select()
    async with app.engine.connect() as plain:
        conn = await without_writer_lock(plain)
        with pytest.raises(ProgrammingError):
            await DirectRow(missing).first(conn, {})
        assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1  # still usable


async def test_a_read_only_unit_of_work_begins_nothing_on_postgresql(app, stub) -> None:  # type: ignore[no-untyped-def]
    """Its connections come set up for reading (reading.read_only_engine): on PostgreSQL
    no transaction is begun for a read, on SQLite one begins DEFERRED as before; the next
    writing transaction on the same pooled connection is a transaction again."""
    reply = await stub.Charge(charge_request())
    payment_id = reply.payment.payment_id
    uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))
    begun: list[object] = []
    with engine_events(app, [("begin", begun.append)]):
        async with uow(read_only=True) as tx:
            read = await tx.payments.get(payment_id)
            begun_by_the_read = len(begun)
            events = await tx.payments.events_after(payment_id, 0, 10)  # SQLAlchemy's path
    postgres = app.engine.dialect.name == "postgresql"
    assert begun_by_the_read == (0 if postgres else 1)
    assert [event.sequence for event in events] == [1, 2, 3]
    assert read.sequence == 3
    async with uow() as tx:  # writes, then rolls back: nothing stays
        await tx.payments.save(read, replace(read, description="changed"), [])
    async with uow(read_only=True) as tx:
        assert (await tx.payments.get(payment_id)).description == read.description
