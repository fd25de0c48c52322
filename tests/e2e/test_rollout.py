"""What a rollout does to replicas (real processes): three replicas starting at once on an
empty database all come up (migrations under an advisory lock), and stopping one of two
replicas behind Envoy while HTTP requests keep coming fails none of them."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from payment_grpc.adapters.bus.postgres import libpq_dsn
from tests.conftest import PG_ADMIN_URL
from tests.e2e.envoy import envoy_gateway
from tests.e2e.server_process import ServerProcess, ledger_authorizations, server_env
from tests.helpers.builders import order_id
from tests.helpers.credentials import TEST_ENCRYPTION_KEYS, token

pytestmark = pytest.mark.slow

REPLICAS_STARTING_TOGETHER = 3
# Requests before the SIGTERM, and at least this many in all; the run ends once the
# stopped replica has exited (bounded by MAX_REQUESTS whatever happens).
REQUESTS_BEFORE_STOP = 60
MIN_REQUESTS = 600
MAX_REQUESTS = 3000
CLIENTS = 6
# Envoy (envoy.local.yaml) checks health every 1 s and needs 2 failures: the drain
# outlasts that, so Envoy has moved traffic away before the port closes.
DRAIN_S = "3"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """A database with no tables at all (not even alembic_version)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    request.getfixturevalue("postgres_url")  # skips (or fails under CI) without PostgreSQL
    name = f"payment_grpc_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_dsn(PG_ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def replica(database_url: str, tmp_path: pathlib.Path, name: str, **extra: str) -> ServerProcess:
    return ServerProcess(
        server_env(
            database_url,
            tmp_path,
            INSTANCE_ID=name,
            DATA_DIR=str(tmp_path / name),
            ENCRYPTION_KEYS=TEST_ENCRYPTION_KEYS,  # one Secret for every replica
            **extra,
        ),
        cwd=tmp_path,
    )


async def stop(server: ServerProcess) -> int:
    server.sigterm()
    return await server.wait()


async def reap(server: ServerProcess) -> None:
    """Kill a replica still running and collect it (no transport left for the GC)."""
    server.kill()
    if server.process is not None and server.process.returncode is None:
        await asyncio.wait_for(server.wait(), 10)


def schema_version(database_url: str) -> list[str]:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        with contextlib.closing(sqlite3.connect(url.database or "")) as db:
            return [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]
    with psycopg.connect(libpq_dsn(database_url)) as conn:
        return [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]


async def test_replicas_starting_at_once_on_an_empty_database_all_come_up(
    empty_database: str, tmp_path: pathlib.Path
) -> None:
    servers = [
        replica(empty_database, tmp_path, f"replica-{n}", MIGRATE_ON_START="true")
        for n in range(REPLICAS_STARTING_TOGETHER)
    ]
    try:
        await asyncio.gather(*(server.start() for server in servers))
        codes = await asyncio.gather(*(stop(server) for server in servers))
    finally:
        await asyncio.gather(*(reap(server) for server in servers))
    logs = "\n".join(server.log for server in servers)
    assert codes == [0] * REPLICAS_STARTING_TOGETHER, logs[-5000:]
    assert "Traceback" not in logs, logs
    assert len(schema_version(empty_database)) == 1


class Load:
    """HTTP clients through the gateway: charges (each with its own idempotency key)
    and reads of one payment, counting every answer by HTTP status."""

    def __init__(self, gateway: Any, payment_id: str) -> None:
        self._gateway = gateway
        self._payment_id = payment_id
        self._headers = {"authorization": f"Bearer {token()}"}
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.failures: list[tuple[int, bytes]] = []
        self.charged: list[str] = []
        self.reached = asyncio.Event()  # REQUESTS_BEFORE_STOP answered
        self.done = asyncio.Event()  # set by the test: the stopped replica has exited

    async def client(self, index: int) -> None:
        while self.sent < MAX_REQUESTS and not (self.done.is_set() and self.sent >= MIN_REQUESTS):
            self.sent += 1
            response = await self._request(index + self.sent)
            self.statuses[response.status] += 1
            if response.status != 200:
                self.failures.append((response.status, response.body[:300]))
            elif "payment_id" in response.json().get("payment", {}) and index % 2 == 0:
                self.charged.append(response.json()["payment"]["payment_id"])
            if sum(self.statuses.values()) >= REQUESTS_BEFORE_STOP:
                self.reached.set()

    async def _request(self, n: int) -> Any:
        if n % 2:
            return await self._gateway.get(f"/v1/payments/{self._payment_id}", self._headers)
        body = {
            "order_id": order_id(),
            "amount": {"currency": "USD", "amount_minor": "1500"},
            "payment_method": {"card": {"token": "tok_visa"}},
        }
        headers = {**self._headers, "idempotency-key": f"load-{uuid.uuid4().hex}"}
        return await self._gateway.post("/v1/payments:charge", body, headers)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_stopping_one_of_two_replicas_behind_envoy_under_load_fails_no_request(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    stopped, staying = (
        replica(database_url, tmp_path, name, SHUTDOWN_DRAIN_SECONDS=DRAIN_S)
        for name in ("replica-a", "replica-b")
    )
    try:
        await asyncio.gather(stopped.start(), staying.start())
        stopped.follow()
        staying.follow()
        async with envoy_gateway([stopped.port, staying.port], tmp_path) as gateway:
            first = await gateway.post(
                "/v1/payments:charge",
                {
                    "order_id": order_id(),
                    "amount": {"currency": "USD", "amount_minor": "999"},
                    "payment_method": {"card": {"token": "tok_visa"}},
                },
                {"authorization": f"Bearer {token()}", "idempotency-key": uuid.uuid4().hex},
            )
            assert first.status == 200, first.body
            load = Load(gateway, first.json()["payment"]["payment_id"])
            clients = asyncio.gather(*(load.client(i) for i in range(CLIENTS)))
            await load.reached.wait()
            code = await stop(stopped)
            load.done.set()
            await clients
        assert code == 0, stopped.log[-3000:]
        assert load.failures == [], (load.statuses, load.failures[:5], stopped.log[-3000:])
        assert sum(load.statuses.values()) >= MIN_REQUESTS
        # Retried writes never moved money twice: one authorization per payment.
        authorizations = ledger_authorizations(tmp_path / "gateway.db")
        assert all(authorizations[p] == 1 for p in load.charged), authorizations
        assert "draining in-flight calls" in stopped.log
    except BaseException:
        print(f"----- stopped replica -----\n{stopped.log[-20_000:]}")  # shown on failure
        print(f"----- envoy -----\n{gateway.log()[-5_000:]}")
        raise
    finally:
        await asyncio.gather(reap(stopped), reap(staying))
