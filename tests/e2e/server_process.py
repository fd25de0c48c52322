"""Run `python -m payment_grpc serve` as a real subprocess and follow its log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import re
import signal
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass

import sqlalchemy as sa

from payment_grpc.adapters.db.engine import make_engine
from payment_grpc.adapters.db.reading import without_writer_lock
from payment_grpc.adapters.db.tables import payment_events, payments, refunds
from tests.helpers.credentials import TEST_ENCRYPTION_KEYS, TEST_JWT_SECRET

# Text (`port=N`) or JSON (`"port": N`) log lines.
LISTENING = re.compile(r'payment-grpc listening.*\bport"?[=:] ?(\d+)')


def server_env(database_url: str, tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    """A server on 127.0.0.1 (port 0) over an already migrated database, its simulated
    gateway's ledger at tmp_path/gateway.db, no gateway latency, no fault point, and the
    tests' JWT secret (channels use tests.helpers.credentials.client_metadata) and
    encryption keys."""
    return {
        "HOST": "127.0.0.1",
        "PORT": "0",
        "DATABASE_URL": database_url,
        "MIGRATE_ON_START": "false",
        "DATA_DIR": str(tmp_path / "data"),
        "GATEWAY_LEDGER_PATH": str(tmp_path / "gateway.db"),
        "GATEWAY_LATENCY_MS_MIN": "0",
        "GATEWAY_LATENCY_MS_MAX": "0",
        "FAULT_POINT": "",
        "SHUTDOWN_GRACE_SECONDS": "5",
        "JWT_SECRET_KEY": TEST_JWT_SECRET,
        "LOG_FORMAT": "text",  # the tests read its lines; unset it would be JSON (a pipe)
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEYS,  # PostgreSQL refuses to start without
        **extra,
    }


class ServerProcess:
    def __init__(self, env: dict[str, str], cwd: pathlib.Path) -> None:
        self._env = {**os.environ, **env}
        self._cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self.lines: list[str] = []
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "payment_grpc", "serve",
            env=self._env, cwd=self._cwd, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        match = await self.wait_for_line(LISTENING)
        self.port = int(match.group(1))

    async def wait_for_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """Read the server's log until a line matches; fails if the server exits first."""
        assert self.process is not None
        assert self.process.stderr is not None
        while True:
            raw = await self.process.stderr.readline()
            if not raw:
                raise AssertionError("server exited early:\n" + "".join(self.lines[-30:]))
            line = raw.decode(errors="replace")
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                return match

    def follow(self) -> None:
        """Keep reading the log in the background (into `lines`), so a long run never
        fills the pipe; wait_for_line must not be used afterwards."""
        assert self.process is not None
        assert self.process.stderr is not None
        self._follower = asyncio.ensure_future(self._read_rest(self.process.stderr))

    async def _read_rest(self, stderr: asyncio.StreamReader) -> None:
        while raw := await stderr.readline():
            self.lines.append(raw.decode(errors="replace"))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def sigterm(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        assert self.process is not None
        assert self.process.stderr is not None
        if self._follower is not None:
            await self._follower
        else:
            self.lines += [
                b.decode(errors="replace")
                for b in (await self.process.stderr.read()).splitlines(True)
            ]
        return await self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


# What the tests observe outside the server: the gateway's ledger and the database rows.


def ledger_authorizations(ledger: pathlib.Path) -> Counter[str]:
    """Payment id -> authorizations the simulated gateway recorded (its own SQLite file)."""
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute("SELECT payment_id FROM ledger WHERE kind = 'authorize'").fetchall()
    return Counter(payment_id for (payment_id,) in rows)


def ledger_follow_ups(ledger: pathlib.Path, kind: str) -> dict[str, list[tuple[int, bool]]]:
    """Payment id -> (amount_minor, succeeded) of every `kind` row ('capture', 'void',
    'refund') the simulated gateway recorded, oldest first. Those rows name the charge by
    its gateway reference; the authorization row maps it back to our payment id."""
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute(
            "SELECT COALESCE(charge.payment_id, op.payment_id), op.amount_minor, op.result"
            " FROM ledger AS op LEFT JOIN ledger AS charge"
            " ON charge.kind = 'authorize' AND charge.reference = op.payment_id"
            " WHERE op.kind = ? ORDER BY op.created_at",
            (kind,),
        ).fetchall()
    found: dict[str, list[tuple[int, bool]]] = {}
    for payment_id, amount_minor, result in rows:
        found.setdefault(payment_id, []).append((amount_minor, json.loads(result)["succeeded"]))
    return found


@dataclass(frozen=True)
class StoredPayment:
    order_id: str
    status: str
    sequence: int
    events: list[tuple[int, str]]  # (sequence, status) in sequence order


async def stored_payments(database_url: str) -> dict[str, StoredPayment]:
    """Every payment in the database with its events, read with a short-lived engine."""
    engine = make_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            conn = await without_writer_lock(conn)
            rows = (await conn.execute(sa.select(payments))).mappings().all()
            events = await conn.execute(
                sa.select(
                    payment_events.c.payment_id, payment_events.c.sequence, payment_events.c.status
                ).order_by(payment_events.c.payment_id, payment_events.c.sequence)
            )
            by_payment: dict[str, list[tuple[int, str]]] = {}
            for payment_id, sequence, status in events:
                by_payment.setdefault(payment_id, []).append((sequence, status))
    finally:
        await engine.dispose()
    return {
        row["id"]: StoredPayment(
            row["order_id"], row["status"], row["sequence"], by_payment.get(row["id"], [])
        )
        for row in rows
    }


@dataclass(frozen=True)
class StoredMoney:
    captured_minor: int
    refunded_minor: int
    in_flight: str  # the claimed gateway operation; "" once it is recorded
    refunds: list[tuple[int, str]]  # (amount_minor, status) of the payment's refunds


async def stored_money(database_url: str, payment_id: str) -> StoredMoney:
    """One payment's amounts, in-flight claim and refunds, read with a short-lived engine."""
    engine = make_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            conn = await without_writer_lock(conn)
            row = (
                await conn.execute(
                    sa.select(
                        payments.c.captured_minor, payments.c.refunded_minor, payments.c.in_flight
                    ).where(payments.c.id == payment_id)
                )
            ).one()
            refund_rows = await conn.execute(
                sa.select(refunds.c.amount_minor, refunds.c.status)
                .where(refunds.c.payment_id == payment_id)
                .order_by(refunds.c.created_at)
            )
            stored_refunds = [(amount_minor, status) for amount_minor, status in refund_rows]
    finally:
        await engine.dispose()
    return StoredMoney(row.captured_minor, row.refunded_minor, row.in_flight, stored_refunds)
