"""What one call costs the server in database work: transactions, SQL statements and
round trips per call, counted in-process (`python -m bench.count`).

Unlike rps on a shared machine, these numbers do not depend on the load: the real
application (bootstrap.build_application) is started in this process against a fresh
database, the calls go through a real gRPC channel one after the other, and SQLAlchemy's
engine events count what reaches the database:

- statements: every cursor execution (an INSERT of several rows sent as one multi-row
  statement counts once), BEGIN included (on PostgreSQL: a transaction's BEGIN, sent with
  its first statement); `(queued)`: sent with the next statement that waits for an answer
  or with the COMMIT (adapters/db/pipelining.py);
- transactions: COMMITs and ROLLBACKs (a statement in autocommit mode is not counted);
  SAVEPOINTs separately;
- round trips (PostgreSQL): measured on the wire. The application reaches PostgreSQL
  through a relay in a process of its own, which counts, per connection, every time the
  client sends after the server last spoke: a pipeline of statements answered together is
  one round trip, a notification the server pushes by itself none. Everything is in it:
  the pool, the status bus's pg_notify (its own connection; `notifies` counts those
  statements), and what runs in the background meanwhile (a lease renewal every few
  seconds: a few hundredths per call). `COUNT_LOG_STATEMENTS=1` has PostgreSQL log every
  statement, to check;
- the simulated gateway's ledger (its own SQLite file): statements and COMMITs.

`cpu ms/call` is this process's CPU time (server and the one client) per call: with one
call at a time it barely depends on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import pathlib
import re
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import psycopg
import sqlalchemy as sa
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb
from sqlalchemy.engine import make_url

import payment_grpc.adapters.gateways.engine as gateway_engine
from bench.scenarios import AMOUNT_MINOR, CARD_TOKEN, CURRENCY, REFUND_MINOR
from bench.server import PG_ADMIN_URL
from payment_grpc.adapters.auth.tokens import mint_token
from payment_grpc.adapters.bus.postgres import libpq_dsn
from payment_grpc.adapters.db.migrate import upgrade
from payment_grpc.adapters.db.pipelining import NO_TRANSACTION, WRITE_BEHIND, PipelinedConnection
from payment_grpc.bootstrap import Application, build_application
from payment_grpc.config import Settings

# One per process: two sessions counting on one server must not drop each other's database.
PG_COUNT_DB = f"payment_grpc_count_{os.getpid()}"
SCOPES = ("payments.charge", "payments.refund", "payments.read")
WARMUP_CALLS = 3  # first calls open connections, fill caches


@dataclass
class Tally:
    statements: Counter[str] = field(default_factory=Counter)  # by statement kind
    commits: int = 0
    rollbacks: int = 0
    savepoints: int = 0  # SAVEPOINT + RELEASE / ROLLBACK TO
    pings: int = 0  # PostgreSQL with pool_pre_ping: a query per checkout
    notifies: int = 0  # pg_notify statements the status bus sent
    ledger_statements: Counter[str] = field(default_factory=Counter)
    ledger_commits: int = 0
    cpu_s: float = 0.0
    wire: Any = None  # PostgreSQL: the proxy's count of round trips (a shared counter)
    turns: int = 0  # its value

    def snapshot(self) -> Tally:
        return Tally(
            Counter(self.statements),
            self.commits,
            self.rollbacks,
            self.savepoints,
            self.pings,
            self.notifies,
            Counter(self.ledger_statements),
            self.ledger_commits,
            time.process_time(),
            self.wire,
            0 if self.wire is None else self.wire.value,
        )

    def minus(self, other: Tally) -> Tally:
        return Tally(
            self.statements - other.statements,
            self.commits - other.commits,
            self.rollbacks - other.rollbacks,
            self.savepoints - other.savepoints,
            self.pings - other.pings,
            self.notifies - other.notifies,
            self.ledger_statements - other.ledger_statements,
            self.ledger_commits - other.ledger_commits,
            self.cpu_s - other.cpu_s,
            self.wire,
            self.turns - other.turns,
        )


def _kind(statement: str) -> str:
    """A statement's verb and table: 'INSERT payments', 'SELECT payments FOR UPDATE'."""
    text = " ".join(statement.split())
    verb = text.split(" ", 1)[0].upper()
    table = ""
    for pattern in (r"\bINTO (\w+)", r"^UPDATE (\w+)", r"\bFROM (\w+)"):
        if found := re.search(pattern, text, re.IGNORECASE):
            table = found.group(1)
            break
    if verb == "SELECT" and "pg_notify" in text:
        table = "pg_notify"
    suffix = " FOR UPDATE" if "FOR UPDATE" in text.upper() else ""
    return f"{verb} {table}{suffix}".strip()


def _watch(app: Application, tally: Tally) -> None:
    engine = app.engine.sync_engine
    postgres = engine.dialect.name == "postgresql"

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _statement(_c: Any, _cur: Any, statement: str, _p: Any, context: Any, _m: bool) -> None:
        queued = postgres and context is not None and context.execution_options.get(WRITE_BEHIND)
        tally.statements[_kind(statement) + (" (queued)" if queued else "")] += 1

    def autocommit(conn: Any) -> bool:  # nothing is sent for BEGIN, COMMIT, ROLLBACK
        options = conn.get_execution_options()
        return bool(options.get("isolation_level") == "AUTOCOMMIT" or options.get(NO_TRANSACTION))

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # SQLite's BEGIN is a statement of its own (engine.py's listener)
        if postgres and not autocommit(conn):
            tally.statements["BEGIN"] += 1

    @sa.event.listens_for(engine, "commit")
    def _commit(conn: Any) -> None:
        if not autocommit(conn):
            tally.commits += 1

    @sa.event.listens_for(engine, "rollback")
    def _rollback(conn: Any) -> None:
        if not autocommit(conn):
            tally.rollbacks += 1

    @sa.event.listens_for(engine, "savepoint")
    def _savepoint(_conn: Any, _name: Any) -> None:
        tally.savepoints += 1

    @sa.event.listens_for(engine, "release_savepoint")
    def _release(_conn: Any, _name: Any, _ctx: Any) -> None:
        tally.savepoints += 1

    if postgres and engine.pool._pre_ping:

        @sa.event.listens_for(engine, "checkout")
        def _checkout(*_args: Any) -> None:
            tally.pings += 1


@contextlib.contextmanager
def _notifies_counted(tally: Tally) -> Any:
    """Counts the statements sent by psycopg itself, past SQLAlchemy: the status bus's
    pg_notify (its own connection) and those queued for the COMMIT (the feed rows)."""
    original = psycopg.AsyncConnection.execute

    async def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if "pg_notify" in str(query):
            tally.notifies += 1
        else:  # past SQLAlchemy's events: reading.DirectRow
            tally.statements[_kind(str(query)) + " (direct)"] += 1
        return await original(self, query, *args, **kwargs)

    queue = PipelinedConnection.queue

    def queued(self: Any, query: Any, *args: Any, **kwargs: Any) -> None:
        tally.statements[_kind(str(query)) + " (queued)"] += 1
        queue(self, query, *args, **kwargs)

    psycopg.AsyncConnection.execute = execute  # type: ignore[method-assign]
    PipelinedConnection.queue = queued  # type: ignore[method-assign]
    try:
        yield
    finally:
        psycopg.AsyncConnection.execute = original  # type: ignore[method-assign]
        PipelinedConnection.queue = queue  # type: ignore[method-assign]


@contextlib.contextmanager
def _ledger_traced(tally: Tally) -> Any:
    """The gateway engine's ledger connection, with a trace callback counting its SQL."""
    original = gateway_engine._open_ledger

    def traced(path: str) -> Any:  # on the ledger's thread
        db = original(path)

        def trace(statement: str) -> None:
            kind = _kind(statement)
            if kind == "COMMIT":
                tally.ledger_commits += 1
            tally.ledger_statements[kind] += 1

        db.set_trace_callback(trace)
        return db

    gateway_engine._open_ledger = traced
    try:
        yield
    finally:
        gateway_engine._open_ledger = original


# ---------------------------------------------------------------- the wire


async def _relay_counted(host: str, port: int, turns: Any, ready: Any) -> None:
    """Forward 127.0.0.1:<the port sent to `ready`> to host:port and count the round
    trips: on each connection, every time the client sends after the server last spoke
    (or first). A pipeline (statements sent back to back, answered together) is one; a
    notification the server pushes on its own adds none."""

    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, port)
        last = ["server"]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, side: str) -> None:
            try:
                while data := await source.read(65536):
                    if side == "client" and last[0] != "client":
                        with turns.get_lock():
                            turns.value += 1
                    last[0] = side
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(client_r, server_w, "client"), pump(server_r, client_w, "server"))

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    ready.send(server.sockets[0].getsockname()[1])
    await server.serve_forever()


def _relay_main(host: str, port: int, turns: Any, ready: Any) -> None:
    """The relay's process: its CPU is not this process's (`cpu_ms`)."""
    asyncio.run(_relay_counted(host, port, turns, ready))


@contextlib.contextmanager
def _through_counting_relay(url: str) -> Any:
    """`url` through a relay (its own process) that counts round trips; (url, counter)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    turns = context.Value("q", 0)
    parsed = make_url(url)
    ours, theirs = context.Pipe()
    relay = context.Process(
        target=_relay_main,
        args=(parsed.host or "127.0.0.1", parsed.port or 5432, turns, theirs),
        daemon=True,
    )
    relay.start()
    try:
        port = ours.recv()
        yield parsed.set(host="127.0.0.1", port=port).render_as_string(False), turns
    finally:
        relay.kill()
        relay.join()


# ---------------------------------------------------------------- databases


@contextlib.contextmanager
def _database(db: str, workdir: pathlib.Path) -> Any:
    if db == "sqlite":
        path = workdir / f"payments-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite+aiosqlite:///{path}"
        upgrade(url)
        yield url
        return
    admin = psycopg.connect(libpq_dsn(PG_ADMIN_URL), autocommit=True)
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{PG_COUNT_DB}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{PG_COUNT_DB}"')
        if os.environ.get("COUNT_LOG_STATEMENTS"):  # cross-check in the server's log
            admin.execute(f"ALTER DATABASE \"{PG_COUNT_DB}\" SET log_statement = 'all'")
        url = make_url(PG_ADMIN_URL).set(database=PG_COUNT_DB).render_as_string(False)
        upgrade(url)
        try:
            yield url
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{PG_COUNT_DB}" WITH (FORCE)')


def _settings(url: str, workdir: pathlib.Path, jwt_secret: str) -> Settings:
    key = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
    return Settings.from_names(
        {
            "database_url": url,
            "host": "127.0.0.1",
            "port": 0,
            "migrate_on_start": False,
            "data_dir": workdir / "data",
            "gateway_ledger_path": workdir / f"ledger-{uuid.uuid4().hex[:8]}.db",
            "gateway_latency_ms_min": 0,
            "gateway_latency_ms_max": 0,
            "gateway_success_rate": 1.0,
            "gateway_seed": 1,
            "recovery_interval_seconds": 3600,  # no pass during the count
            "jwt_secret_key": jwt_secret,
            "encryption_keys": f"count:{key}",
            "rate_limit_per_second": 0,
            "health_check_interval_seconds": 3600,  # its probe would add transactions
            "log_level": "WARNING",
        }
    )


# ---------------------------------------------------------------- scenarios

Stub: TypeAlias = "payment_service_pb2_grpc.PaymentServiceAsyncStub"
Metadata = tuple[tuple[str, str], ...]


def _charge_request(order: str) -> api.ChargeRequest:
    request = api.ChargeRequest(order_id=order)
    request.amount.currency = CURRENCY
    request.amount.amount_minor = AMOUNT_MINOR
    request.payment_method.card.token = CARD_TOKEN
    return request


async def _charge(stub: Stub, auth: Metadata, key: str | None = None) -> str:
    key = key or uuid.uuid4().hex
    reply = await stub.Charge(
        _charge_request(f"count-{key}"), metadata=(*auth, ("idempotency-key", key))
    )
    return str(reply.payment.payment_id)


Prepare = Callable[[Stub, Metadata, int], Awaitable[list[str]]]
Call = Callable[[Stub, Metadata, int, list[str]], Awaitable[object]]


async def _none(_stub: Stub, _auth: Metadata, _n: int) -> list[str]:
    return []


async def _prepared_keys(stub: Stub, auth: Metadata, n: int) -> list[str]:
    keys = [uuid.uuid4().hex for _ in range(n)]
    for key in keys:
        await _charge(stub, auth, key)
    return keys


async def _prepared_payments(stub: Stub, auth: Metadata, n: int) -> list[str]:
    return [await _charge(stub, auth) for _ in range(n)]


async def _call_charge(stub: Stub, auth: Metadata, _i: int, _p: list[str]) -> object:
    return await _charge(stub, auth)


async def _call_replay(stub: Stub, auth: Metadata, i: int, keys: list[str]) -> object:
    return await _charge(stub, auth, keys[i])


async def _call_get(stub: Stub, auth: Metadata, i: int, ids: list[str]) -> object:
    return await stub.GetPayment(api.GetPaymentRequest(payment_id=ids[i]), metadata=auth)


async def _call_refund(stub: Stub, auth: Metadata, i: int, ids: list[str]) -> object:
    request = api.RefundRequest(
        payment_id=ids[i], amount=pb.Money(currency=CURRENCY, amount_minor=REFUND_MINOR)
    )
    key = uuid.uuid4().hex
    return await stub.Refund(request, metadata=(*auth, ("idempotency-key", key)))


SCENARIOS: dict[str, tuple[Prepare, Call]] = {
    "charge": (_none, _call_charge),
    "replay": (_prepared_keys, _call_replay),
    "get": (_prepared_payments, _call_get),
    "refund": (_prepared_payments, _call_refund),
}


@contextlib.asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[Application]:
    app = build_application(settings)
    await app.start()
    try:
        await app.recovery.wait_for_passes(1)
        yield app
    finally:
        await app.stop()


async def _measure(
    url: str, workdir: pathlib.Path, scenario: str, calls: int, wire: Any = None
) -> Tally:
    """The tally of `calls` calls, after a few unmeasured ones."""
    jwt_secret = secrets.token_urlsafe(32)
    token = mint_token(
        jwt_secret,
        subject="count",
        scopes=SCOPES,
        audience="payment-service",
        issuer="payment-grpc",
    )
    auth: Metadata = (("authorization", f"Bearer {token}"),)
    prepare, call = SCENARIOS[scenario]
    tally = Tally(wire=wire)
    with _ledger_traced(tally), _notifies_counted(tally):
        async with _running(_settings(url, workdir, jwt_secret)) as app:
            _watch(app, tally)
            async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub: Stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
                prepared = await prepare(stub, auth, calls + WARMUP_CALLS)
                for i in range(WARMUP_CALLS):
                    await call(stub, auth, calls + i, prepared)
                start = tally.snapshot()
                for i in range(calls):
                    await call(stub, auth, i, prepared)
                return tally.snapshot().minus(start)
    raise AssertionError("unreachable")


def _count(db: str, scenario: str, calls: int, verbose: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, _database(db, pathlib.Path(tmp)) as url:
        workdir = pathlib.Path(tmp)
        if db == "postgresql":
            with _through_counting_relay(url) as (relayed, wire):
                tally = asyncio.run(_measure(relayed, workdir, scenario, calls, wire))
        else:
            tally = asyncio.run(_measure(url, workdir, scenario, calls))
    per = 1 / calls
    statements = sum(tally.statements.values())
    transactions = tally.commits + tally.rollbacks
    round_trips = tally.turns if db == "postgresql" else None
    row: dict[str, object] = {
        "db": db,
        "scenario": scenario,
        "transactions": transactions * per,
        "statements": statements * per,
        "savepoints": tally.savepoints * per,
        "round_trips": None if round_trips is None else round_trips * per,
        "pings": tally.pings * per,
        "notifies": tally.notifies * per,
        "ledger_statements": sum(tally.ledger_statements.values()) * per,
        "ledger_commits": tally.ledger_commits * per,
        "cpu_ms": tally.cpu_s * 1000 * per,
    }
    if verbose:
        print(f"\n{db} {scenario}: statements per call", file=sys.stderr)
        for kind, n in sorted(tally.statements.items()):
            print(f"  {n * per:5.2f}  {kind}", file=sys.stderr)
        print(f"  ledger: {dict(tally.ledger_statements)} / {calls}", file=sys.stderr)
    return row


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


COLUMNS = (
    "db",
    "scenario",
    "transactions",
    "statements",
    "savepoints",
    "round_trips",
    "pings",
    "notifies",
    "ledger_statements",
    "ledger_commits",
    "cpu_ms",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.count", description=__doc__)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="charge")
    parser.add_argument("-n", "--calls", type=int, default=50, help="measured calls (default 50)")
    parser.add_argument("-v", "--verbose", action="store_true", help="statements by kind")
    args = parser.parse_args(argv)
    dbs = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    scenarios = tuple(SCENARIOS) if args.scenario == "all" else (args.scenario,)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for db in dbs:
        for scenario in scenarios:
            row = _count(db, scenario, args.calls, args.verbose)
            print("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
