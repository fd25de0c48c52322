"""Migration 0005_key_operation converts stored keys from the RPC path to their operation
(and back on downgrade), on SQLite and PostgreSQL: a key stored before the upgrade is
still found, under the same (scope, operation, key)."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import make_url

from payment_grpc.adapters.bus.postgres import libpq_dsn
from payment_grpc.adapters.db.migrate import alembic_config
from payment_grpc.api.responses import OPERATIONS
from tests.conftest import PG_ADMIN_URL

REVISION = "0005_key_operation"
STORED = {path: operation.value for path, operation in OPERATIONS.items()}


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """An empty database (no schema yet)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
        return
    name = f"payment_grpc_migration_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_dsn(PG_ADMIN_URL), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sync_engine(url: str) -> sa.Engine:
    parsed = make_url(url)
    driver = "sqlite" if parsed.drivername.startswith("sqlite") else "postgresql+psycopg"
    return sa.create_engine(parsed.set(drivername=driver))


def _rows(url: str, column: str) -> dict[str, str]:
    engine = _sync_engine(url)
    try:
        with engine.connect() as conn:
            keys = sa.table("idempotency_keys", sa.column("key"), sa.column(column))
            rows = conn.execute(sa.select(keys.c.key, keys.c[column]))
            return {key: value for key, value in rows}
    finally:
        engine.dispose()


def _store_keys_by_path(url: str) -> None:
    now = datetime.now(UTC)
    engine = _sync_engine(url)
    try:
        with engine.begin() as conn:
            for path in STORED:
                conn.execute(
                    sa.text(
                        "INSERT INTO idempotency_keys (id, scope, method, key, fingerprint,"
                        " recovery_point, created_at, expires_at) VALUES (:id, 'svc', :method,"
                        " :key, 'f', 'FINISHED', :now, :later)"
                    ),
                    {
                        "id": f"idk_{uuid.uuid4().hex}",
                        "method": path,
                        "key": path.rsplit("/", 1)[1],
                        "now": now,
                        "later": now + timedelta(hours=1),
                    },
                )
    finally:
        engine.dispose()


def test_stored_keys_move_from_their_rpc_path_to_their_operation_and_back(
    fresh_url: str,
) -> None:
    config = alembic_config(fresh_url)
    command.upgrade(config, f"{REVISION}-1")
    _store_keys_by_path(fresh_url)

    command.upgrade(config, REVISION)
    by_key = {path.rsplit("/", 1)[1]: op for path, op in STORED.items()}
    assert _rows(fresh_url, "operation") == by_key

    command.downgrade(config, f"{REVISION}-1")
    assert _rows(fresh_url, "method") == {p.rsplit("/", 1)[1]: p for p in STORED}
