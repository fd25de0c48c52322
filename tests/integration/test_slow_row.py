"""One slow row must not take the service down.

Another transaction holds a lock the service needs (one payment row on PostgreSQL; the
single writer lock on SQLite, which has no row locks). Calls that need the lock answer a
retryable code with RetryInfo after a bounded wait, while the lock is still held; calls
that do not need it keep working; readiness stays SERVING. A connection-pool timeout is
UNAVAILABLE, never INTERNAL.
"""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from payment_grpc.adapters.bus.postgres import libpq_dsn
from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.bootstrap import Application, build_cipher
from payment_grpc.config import Settings
from payment_grpc.service.errors import StorageUnavailable
from tests.conftest import make_settings
from tests.helpers.builders import charge_request
from tests.helpers.calls import RichError

LOCKED_CALLS = 12  # more than the pool holds (2 + 2 overflow)
OTHER_CHARGES = 8
CALL_TIMEOUT_S = 20  # far above the lock timeout: hitting it means the wait was unbounded
RETRYABLE = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE})


@pytest.fixture
def settings(database_url: str, tmp_path: pathlib.Path) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        db_pool_size=2,
        db_lock_timeout_seconds=0.5,
        gateway_success_rate=1.0,
    )


@asynccontextmanager
async def payment_row_locked(url: str, payment_id: str) -> AsyncIterator[None]:
    """Another client holds a lock on the payment until the block ends."""
    if make_url(url).get_backend_name() == "sqlite":
        # SQLite locks the whole database for a writer: hold its write lock.
        conn = sqlite3.connect(make_url(url).database or "", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    async with await psycopg.AsyncConnection.connect(libpq_dsn(url)) as conn:
        await conn.execute("SELECT id FROM payments WHERE id = %s FOR UPDATE", (payment_id,))
        yield
        await conn.rollback()


async def outcome(call: object) -> RichError | None:
    try:
        await call  # type: ignore[misc]
    except aio.AioRpcError as error:
        return RichError(error)
    return None


async def readiness(app: Application) -> int:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as plain:
        health = health_pb2_grpc.HealthStub(plain)
        request = health_pb2.HealthCheckRequest(service="payments.v1.PaymentService")
        return (await health.Check(request, timeout=10)).status


async def test_a_locked_payment_does_not_take_the_service_down(
    app: Application, stub, database_url: str
) -> None:
    locked = (await stub.Charge(charge_request(5_000, manual=True), timeout=10)).payment
    other = (await stub.Charge(charge_request(5_000), timeout=10)).payment
    on_postgres = make_url(database_url).get_backend_name() == "postgresql"
    capture = api.CapturePaymentRequest(payment_id=locked.payment_id)

    async with payment_row_locked(database_url, locked.payment_id):
        locked_calls = [
            outcome(stub.CapturePayment(capture, timeout=CALL_TIMEOUT_S))
            for _ in range(LOCKED_CALLS)
        ]
        # SQLite has one writer: while it is held no Charge can write, but reads go on.
        unrelated = [
            outcome(stub.Charge(charge_request(1_000), timeout=CALL_TIMEOUT_S))
            if on_postgres
            else outcome(
                stub.GetPayment(
                    api.GetPaymentRequest(payment_id=other.payment_id), timeout=CALL_TIMEOUT_S
                )
            )
            for _ in range(OTHER_CHARGES)
        ]
        answers = await asyncio.gather(*locked_calls, *unrelated, readiness(app))
        # Everything above was answered while the lock is still held.
        on_locked, on_others, ready = (
            answers[:LOCKED_CALLS],
            answers[LOCKED_CALLS:-1],
            answers[-1],
        )

    for error in on_locked:
        assert error is not None, "a capture ran although its payment was locked"
        assert error.code in RETRYABLE, (error.code, error.message)
        assert error.has_retry, "a retryable answer carries RetryInfo"
    assert on_others == [None] * OTHER_CHARGES, [(e.code, e.message) for e in on_others if e]
    assert ready == health_pb2.HealthCheckResponse.SERVING
    # The lock is gone: the capture goes through now.
    captured = await stub.CapturePayment(capture, timeout=10)
    assert captured.payment.captured_amount.amount_minor == 5_000


async def test_a_pool_timeout_is_storage_unavailable(settings: Settings) -> None:
    """Every pooled connection in use and none free in time: StorageUnavailable (the
    transport answers UNAVAILABLE with RetryInfo), not the pool's own TimeoutError."""
    url = settings.database.url
    engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    uow = SqlUnitOfWorkFactory(engine, build_cipher(settings))
    try:
        async with uow(read_only=True):  # holds the only connection
            with pytest.raises(StorageUnavailable):
                async with uow(read_only=True):
                    pass
        async with engine.connect() as conn:  # the pool recovers once it is given back
            assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
