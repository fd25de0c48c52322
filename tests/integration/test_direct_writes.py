"""A Charge's writes on PostgreSQL past SQLAlchemy (writing.DirectWrite, issue 12) and the
payment events written with their feed rows in one statement (event_log.py): the same rows
as SQLAlchemy's path writes, SQLAlchemy's errors, and a traced engine's writes still
through SQLAlchemy. Each test that is not psycopg-only runs on SQLite too (SQLAlchemy's
path there)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.adapters.db.pipelining import write_behind
from payment_grpc.adapters.db.tables import (
    idempotency_keys,
    payment_events,
    payment_feed,
)
from payment_grpc.adapters.db.writing import DirectConnection, DirectWrite
from payment_grpc.bootstrap import Application, build_cipher
from tests.helpers.builders import card, charge_request, keyed
from tests.helpers.db import engine_events, events_of

METADATA = {"cart": "42", "note": "ünïcode"}


@contextmanager
def _statements(app: Application) -> Iterator[list[str]]:
    """The statements SQLAlchemy's engine events see (what the OTel instrumentation sees)."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    with engine_events(app, [("before_cursor_execute", before)]):
        yield seen


async def test_a_charge_writes_its_rows_past_sqlalchemy_on_postgresql(app, stub) -> None:  # type: ignore[no-untyped-def]
    postgres = app.engine.dialect.name == "postgresql"
    with _statements(app) as seen:
        reply = await stub.Charge(
            charge_request(method=card("tok_visa"), metadata=METADATA),
            metadata=keyed(uuid.uuid4().hex),
        )
    writes = [s for s in seen if s.startswith(("INSERT", "UPDATE", "WITH"))]
    assert (writes == []) is postgres  # SQLAlchemy's path on SQLite
    payment_id = reply.payment.payment_id
    async with SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))() as tx:
        stored = await tx.payments.get(payment_id)
    assert stored.status.value == "CAPTURED"
    assert stored.metadata == METADATA
    assert stored.card is not None
    assert stored.card.last4 == "4242"
    assert stored.sequence == 3
    assert await events_of(app, payment_id) == [
        (1, None, "PENDING"),
        (2, "PENDING", "PROCESSING"),
        (3, "PROCESSING", "CAPTURED"),
    ]
    async with app.engine.connect() as conn:
        feed = (
            await conn.execute(
                sa.select(payment_feed.c.sequence, payment_feed.c.status, payment_feed.c.order_id)
                .where(payment_feed.c.payment_id == payment_id)
                .order_by(payment_feed.c.tx, payment_feed.c.position)
            )
        ).all()
        events = (
            await conn.execute(
                sa.select(payment_events).where(payment_events.c.payment_id == payment_id)
            )
        ).mappings()
        assert {row["occurred_at"].utcoffset() is not None for row in events} == {True}
        key = (
            await conn.execute(
                sa.select(idempotency_keys.c.recovery_point, idempotency_keys.c.payment_id)
            )
        ).one()
    order = reply.payment.order_id
    assert [tuple(row) for row in feed] == [
        (1, "PENDING", order),
        (2, "PROCESSING", order),
        (3, "CAPTURED", order),
    ]
    assert tuple(key) == ("FINISHED", payment_id)


async def test_traced_writes_keep_going_through_sqlalchemy(app, stub) -> None:  # type: ignore[no-untyped-def]
    reply = await stub.Charge(charge_request())
    uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings), statement_spans=True)
    with _statements(app) as seen:
        async with uow() as tx:
            before = await tx.payments.get(reply.payment.payment_id, for_update=True)
            await tx.payments.save(before, replace(before, description="traced"), [])
            await tx.commit()
    assert any(s.startswith("UPDATE payments SET") for s in seen)
    async with uow(read_only=True) as tx:
        assert (await tx.payments.get(reply.payment.payment_id)).description == "traced"


def _key(record_id: str, created: datetime) -> dict[str, Any]:
    return {
        "id": record_id,
        "scope": "test",
        "operation": "charge",
        "key": record_id,
        "fingerprint": "f" * 64,
        "recovery_point": "STARTED",
        "payment_id": None,
        "refund_id": None,
        "locked_by": "me",
        "locked_at": created,
        "response_code": None,
        "response_body": None,
        "created_at": created,
        "expires_at": created,
    }


CLAIM = postgresql.insert(idempotency_keys).on_conflict_do_nothing()
UPDATE = idempotency_keys.update().where(idempotency_keys.c.id == sa.bindparam("b_id"))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # psycopg only
async def test_the_direct_write_is_sqlalchemys(app) -> None:  # type: ignore[no-untyped-def]
    created = datetime(2026, 12, 1, 12, 30, tzinfo=UTC)
    claim = DirectWrite(CLAIM.returning(idempotency_keys.c.id))
    later = DirectWrite(write_behind(UPDATE))
    select = sa.select(idempotency_keys).order_by(idempotency_keys.c.id)
    async with app.engine.connect() as conn:
        await conn.begin()
        direct = DirectConnection(conn)
        assert await claim.first(conn, direct, _key("idk_a", created)) == ("idk_a",)
        assert await claim.first(conn, direct, _key("idk_a", created)) is None  # conflict
        await conn.execute(CLAIM, _key("idk_b", created))  # SQLAlchemy's own path
        changed = DirectWrite(UPDATE)
        assert await changed.rowcount(conn, direct, {"b_id": "idk_b", "locked_by": "x"}) == 1
        assert await changed.rowcount(conn, direct, {"b_id": "nope", "locked_by": "x"}) == 0
        await later.write_behind(conn, direct, {"b_id": "idk_a", "locked_by": "x"})
        await later.write_behind(conn, direct, {"b_id": "idk_b", "response_code": 0})
        rows = [dict(row) for row in (await conn.execute(select)).mappings()]  # sees them
        await conn.commit()
    a, b = rows
    assert {k: v for k, v in a.items() if k not in ("id", "key", "response_code")} == {
        k: v for k, v in b.items() if k not in ("id", "key", "response_code")
    }
    assert a["locked_by"] == b["locked_by"] == "x"
    assert a["created_at"] == created
    assert a["created_at"].tzinfo is not None
    assert b["response_code"] == 0
    async with app.engine.connect() as conn:  # outside a transaction: at once
        await later.write_behind(conn, DirectConnection(conn), {"b_id": "idk_a", "key": "z"})
        assert (await conn.execute(select)).mappings().first()["key"] == "z"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # psycopg only
async def test_a_direct_write_refuses_what_sqlalchemy_refuses(app) -> None:  # type: ignore[no-untyped-def]
    claim = DirectWrite(CLAIM.returning(idempotency_keys.c.id))
    async with app.engine.connect() as conn:
        await conn.begin()
        direct = DirectConnection(conn)
        with pytest.raises(ValueError, match="naive"):
            await claim.first(conn, direct, _key("idk_n", datetime(2026, 12, 1)))
        with pytest.raises(KeyError, match="b_id"):
            await DirectWrite(UPDATE).rowcount(conn, direct, {"locked_by": "x"})
        too_long = {**_key("idk_l", datetime.now(UTC)), "scope": "s" * 300}
        with pytest.raises(sa.exc.DataError):
            await claim.first(conn, direct, too_long)
        await conn.rollback()
        await conn.begin()
        await conn.execute(sa.text("CREATE TEMPORARY TABLE probe (id int primary key)"))
        probe = DirectWrite(sa.table("probe", sa.column("id")).insert())
        await probe.rowcount(conn, direct, {"id": 1})
        with pytest.raises(IntegrityError):
            await probe.rowcount(conn, direct, {"id": 1})
        await conn.rollback()
        assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1  # still usable
