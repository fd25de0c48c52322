"""Shared fixtures: a migrated database per test on SQLite AND PostgreSQL, a real
grpc.aio server on 127.0.0.1 port 0, and the generated stub talking to it."""

from __future__ import annotations

import os
import pathlib
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import psycopg
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2_grpc
from sqlalchemy.engine import make_url

from payment_grpc.adapters.bus.postgres import libpq_dsn
from payment_grpc.adapters.db.migrate import upgrade
from payment_grpc.bootstrap import Application, build_application
from payment_grpc.config import Settings
from tests.helpers.credentials import TEST_ENCRYPTION_KEYS, TEST_JWT_SECRET, client_metadata

PG_ADMIN_URL = os.environ.get("PG_TEST_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLES = (
    "payment_events",
    "refunds",
    "payments",
    "idempotency_keys",
    "gateway_events",
    "outbox",
    "payment_feed",
)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("template") / "payments.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session, migrated once, dropped at the end."""
    name = f"payment_grpc_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(libpq_dsn(PG_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL must be reachable under CI=true: {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, sqlite_template: pathlib.Path
) -> str:
    if request.param == "sqlite":
        path = tmp_path / "db" / "payments.db"
        path.parent.mkdir()
        shutil.copyfile(sqlite_template, path)
        return f"sqlite+aiosqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)}")
    return url


def make_settings(database_url: str, tmp_path: pathlib.Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": 0,
        "migrate_on_start": False,
        "data_dir": tmp_path / "data",
        "gateway_ledger_path": tmp_path / "gateway.db",
        "gateway_latency_ms_min": 0,
        "gateway_latency_ms_max": 0,
        # Long enough that a loaded machine records the charge before the settlement lands.
        "gateway_async_settle_ms": 1000,
        "gateway_seed": 7,
        "recovery_interval_seconds": 3600,
        "recovery_stale_seconds": 0,
        "health_check_interval_seconds": 0.05,
        "shutdown_grace_seconds": 5,
        "jwt_secret_key": TEST_JWT_SECRET,
        "encryption_keys": TEST_ENCRYPTION_KEYS,
        "rate_limit_per_second": 0,  # on in test_rate_limit.py; off so bursts of calls stay simple
    }
    values.update(overrides)
    return Settings.from_names(values)


@pytest.fixture
def settings(database_url: str, tmp_path: pathlib.Path) -> Settings:
    return make_settings(database_url, tmp_path)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Application]:
    application = build_application(settings)
    await application.start()
    try:
        yield application
    finally:
        await application.stop()


@pytest.fixture
async def channel(app: Application) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}", interceptors=client_metadata()) as ch:
        yield ch


@pytest.fixture
async def bare_channel(app: Application) -> AsyncIterator[aio.Channel]:
    """A channel that adds only the admin token: the test sets idempotency keys itself."""
    async with aio.insecure_channel(
        f"127.0.0.1:{app.port}", interceptors=client_metadata(keys=False)
    ) as ch:
        yield ch


@pytest.fixture
def stub(channel: aio.Channel) -> payment_service_pb2_grpc.PaymentServiceStub:
    return payment_service_pb2_grpc.PaymentServiceStub(channel)


__all__ = ["grpc"]
