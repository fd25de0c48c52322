"""`python -m bench.gateway_mix`: the gateway side under a mixed load, then reconciliation.

The service runs with GATEWAY=stripe (the official SDK) against `payment-grpc gateway-sim`
(the Stripe-compatible simulator, a separate process) with declines, lost answers
(`network_error`), asynchronous UPI payments settled by signed webhooks that `--chaos`
duplicates and reorders, and faults injected into the simulator's API all along
(429 rate limits, 500s, answers dropped after the work was done). Clients mix Charge
(automatic and manual capture, cards and UPI), partial CapturePayment, CancelPayment and
one or two partial Refunds, each with an idempotency key, retried with the same key on
UNAVAILABLE / ABORTED / DEADLINE_EXCEEDED like a real caller. When the load stops, the
bench waits until nothing is in flight (recovery, sync and webhooks finish what the
faults left open), then runs `payment-grpc reconcile` against the simulator's records
(Stripe's list APIs): the run passes with 0 mismatches. Exit 1 otherwise.

    python -m bench.gateway_mix                      # PostgreSQL, 20 s, 16 clients
    python -m bench.gateway_mix --db sqlite --duration 10 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import sqlalchemy as sa
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb
from sqlalchemy.engine import make_url

from bench.collaborators import stop_process
from bench.server import ServerSecrets, free_port, fresh_database, running_server
from bench.stats import percentile
from bench.worker import _credentials

API_KEY = "sk_test_bench"
WEBHOOK_SECRET = "whsec_bench"  # noqa: S105 - a throw-away simulator secret
CURRENCY = "USD"
RETRIED = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
ATTEMPTS = 6
CALL_TIMEOUT_S = 20.0
FAULTS = ("rate_limit", "server_error", "disconnect_after")
SETTLE_TIMEOUT_S = 120.0
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
# Tokens without a fixed outcome are decided by --success-rate and the failure mix
# (declines, and "network_error": charged, answer lost); tok_chargeDeclined always fails.
CARD_TOKENS = ("tok_visa",) * 5 + ("tok_bench_mixed",) * 4 + ("tok_chargeDeclined",)
SERVER_ENV = {
    "GATEWAY": "stripe",
    "STRIPE_API_KEY": API_KEY,
    "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "STRIPE_TIMEOUT_SECONDS": "5",
    "RECOVERY_INTERVAL_SECONDS": "1",
    "RECOVERY_STALE_SECONDS": "2",
    "GATEWAY_SYNC_AFTER_SECONDS": "2",
}


@dataclass
class Tally:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    answers: Counter[str] = field(default_factory=Counter)  # "RPC CODE" of each final answer
    retries: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # final error answers' messages
    flows: Counter[str] = field(default_factory=Counter)


Stub = payment_service_pb2_grpc.PaymentServiceStub


class Client:
    def __init__(self, stub: Stub, credentials: Sequence[tuple[str, str]], tally: Tally) -> None:
        self._stub = stub
        self._credentials = tuple(credentials)
        self._tally = tally

    async def call(self, rpc: str, request: Any) -> Any | None:
        """One keyed call, retried with the same key like a careful client; the reply, or
        None when the last answer was an error."""
        method: Callable[..., Awaitable[Any]] = getattr(self._stub, rpc)
        metadata = (*self._credentials, ("idempotency-key", uuid.uuid4().hex))
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        for attempt in range(ATTEMPTS):
            try:
                reply = await method(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            except aio.AioRpcError as exc:
                code = exc.code()
                if code not in RETRIED or attempt == ATTEMPTS - 1:
                    self._tally.errors[f"{rpc} {code.name}: {exc.details()}"[:200]] += 1
                    break
                self._tally.retries[f"{rpc} {code.name}"] += 1
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.5))
            else:
                self._record(rpc, started, grpc.StatusCode.OK)
                return reply
        self._record(rpc, started, code)
        return None

    def _record(self, rpc: str, started: float, code: grpc.StatusCode) -> None:
        self._tally.latencies_ms[rpc].append((time.perf_counter() - started) * 1000)
        self._tally.answers[f"{rpc} {code.name}"] += 1


def _charge(order: str, amount: int, method: pb.PaymentMethod, manual: bool) -> Any:
    return api.ChargeRequest(
        order_id=order,
        amount=pb.Money(currency=CURRENCY, amount_minor=amount),
        payment_method=method,
        capture_method=pb.CAPTURE_METHOD_MANUAL if manual else pb.CAPTURE_METHOD_AUTOMATIC,
    )


async def _refunds(client: Client, rng: random.Random, payment: pb.Payment) -> None:
    """One partial refund, sometimes followed by one of the whole remainder."""
    captured = payment.captured_amount.amount_minor
    part = rng.randint(1, max(1, captured // 2))
    money = pb.Money(currency=CURRENCY, amount_minor=part)
    await client.call("Refund", api.RefundRequest(payment_id=payment.payment_id, amount=money))
    if rng.random() < 0.3:
        await client.call("Refund", api.RefundRequest(payment_id=payment.payment_id))


async def flow(client: Client, rng: random.Random, tally: Tally) -> None:
    order = f"mix_{uuid.uuid4().hex[:16]}"  # "_" glued: never card-number-shaped
    amount = rng.randint(500, 50_000)
    roll = rng.random()
    if roll < 0.2:
        tally.flows["upi"] += 1
        upi = pb.PaymentMethod(upi=pb.UpiMethod(vpa="payer@okbank"))
        await client.call("Charge", _charge(order, amount, upi, manual=False))
        return
    card = pb.PaymentMethod(card=pb.CardMethod(token=rng.choice(CARD_TOKENS)))
    manual = roll < 0.55
    reply = await client.call("Charge", _charge(order, amount, card, manual))
    payment = reply.payment if reply is not None else None
    if not manual:
        tally.flows["card"] += 1
        captured = payment is not None and payment.status == pb.PAYMENT_STATUS_CAPTURED
        if captured and payment is not None and rng.random() < 0.5:
            await _refunds(client, rng, payment)
        return
    tally.flows["manual"] += 1
    if payment is None or payment.status != pb.PAYMENT_STATUS_AUTHORIZED:
        return
    if rng.random() < 0.4:
        await client.call("CancelPayment", api.CancelPaymentRequest(payment_id=payment.payment_id))
        return
    part = pb.Money(currency=CURRENCY, amount_minor=rng.randint(amount // 2, amount))
    captured = await client.call(
        "CapturePayment", api.CapturePaymentRequest(payment_id=payment.payment_id, amount=part)
    )
    if captured is not None and rng.random() < 0.4:
        await _refunds(client, rng, captured.payment)


async def inject_faults(base_url: str, stop: asyncio.Event, seed: int) -> int:
    """Queues one random fault for the simulator's next API request every 200 ms; the
    number that met a request."""
    rng, sent = random.Random(seed), 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            fault = rng.choice(FAULTS)
            async with session.post(f"{base_url}/_sim/faults", data={"faults": fault}) as reply:
                reply.raise_for_status()
            sent += 1
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        # Faults the load did not use up would hit recovery and reconcile afterwards.
        async with session.post(f"{base_url}/_sim/faults", data={"clear": "1"}) as reply:
            sent -= int((await reply.json())["cleared"])
    return sent


async def load(target: str, jwt_secret: str, base_url: str, args: argparse.Namespace) -> Tally:
    tally = Tally()
    credentials = _credentials(jwt_secret)
    stop = asyncio.Event()
    async with aio.insecure_channel(target) as channel:
        client = Client(payment_service_pb2_grpc.PaymentServiceStub(channel), credentials, tally)
        faults = asyncio.create_task(inject_faults(base_url, stop, args.seed))
        deadline = time.monotonic() + args.duration

        async def one_client(n: int) -> None:
            rng = random.Random(args.seed * 1000 + n)
            while time.monotonic() < deadline:
                await flow(client, rng, tally)

        await asyncio.gather(*(one_client(n) for n in range(args.concurrency)))
        stop.set()
        tally.flows["faults met"] = await faults
    return tally


def _sync_url(database_url: str) -> str:
    url = make_url(database_url)
    driver = "sqlite" if url.drivername.startswith("sqlite") else "postgresql+psycopg"
    return url.set(drivername=driver).render_as_string(hide_password=False)


def unsettled(database_url: str) -> tuple[int, int]:
    """(payments PROCESSING or with a claimed operation, refunds PENDING)."""
    engine = sa.create_engine(_sync_url(database_url))
    try:
        with engine.connect() as conn:
            payments = conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM payments WHERE status = 'PROCESSING' OR in_flight != ''"
                )
            ).scalar_one()
            refunds = conn.execute(
                sa.text("SELECT COUNT(*) FROM refunds WHERE status = 'PENDING'")
            ).scalar_one()
    finally:
        engine.dispose()
    return int(payments), int(refunds)


def statuses(database_url: str) -> dict[str, int]:
    engine = sa.create_engine(_sync_url(database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT status, COUNT(*) FROM payments GROUP BY status"))
            found = {str(status): int(count) for status, count in rows}
            refunds = conn.execute(sa.text("SELECT status, COUNT(*) FROM refunds GROUP BY status"))
            found |= {f"refund {status}": int(count) for status, count in refunds}
    finally:
        engine.dispose()
    return dict(sorted(found.items()))


@contextmanager
def simulator(workdir: pathlib.Path, webhook_port: int, args: argparse.Namespace) -> Iterator[str]:
    command = [
        sys.executable, "-m", "payment_grpc", "gateway-sim",
        "--port", "0",
        "--api-key", API_KEY,
        "--ledger", str(workdir / "sim-ledger.db"),
        "--seed", str(args.seed),
        "--success-rate", "0.85",
        "--failure-mix", "declined=50,insufficient_funds=20,network_error=20,invalid_method=10",
        "--latency-ms-min", "5",
        "--latency-ms-max", "40",
        "--async-settle-ms", "500",
        "--webhook-url", f"http://127.0.0.1:{webhook_port}/v1/webhooks/stripe",
        "--webhook-secret", WEBHOOK_SECRET,
        "--webhook-retry-ms", "100",
        "--chaos",
    ]  # fmt: skip
    log = (workdir / "sim.log").open("wb")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
    try:
        assert process.stdout is not None
        match = LISTENING.search(process.stdout.readline())
        if match is None:
            raise RuntimeError("gateway-sim did not start: " + (workdir / "sim.log").read_text())
        yield f"http://127.0.0.1:{int(match.group(1))}"
    finally:
        stop_process(process, log)


def reconcile(env: dict[str, str], since: datetime.datetime) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "payment_grpc", "reconcile", "--since", since.isoformat(),
         "--format", "json"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"reconcile exited {done.returncode}: {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _report(tally: Tally, wall_s: float) -> None:
    calls = sum(tally.answers.values())
    rate = calls / wall_s
    print(f"{calls} answers in {wall_s:.1f} s = {rate:.0f}/s (a retried call counts once)")
    print("| RPC | answers | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for rpc, values in sorted(tally.latencies_ms.items()):
        ordered = sorted(values)
        p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
        print(f"| {rpc} | {len(values)} | {p50:.1f} | {p99:.1f} |")
    print("answers:", dict(sorted(tally.answers.items())))
    print("retried with the same key:", dict(sorted(tally.retries.items())))
    print("errors:", dict(tally.errors.most_common(5)))
    print("flows:", dict(tally.flows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_mix", description=__doc__)
    parser.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--logs", type=pathlib.Path, help="copy the server's and simulator's logs here"
    )
    args = parser.parse_args(argv)
    run_secrets = ServerSecrets.generate()
    since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-mix-") as tmp:
        workdir = pathlib.Path(tmp)
        webhook_port = free_port()
        with (
            fresh_database(args.db, workdir) as database_url,
            simulator(workdir, webhook_port, args) as base_url,
        ):
            extra = {**SERVER_ENV, "STRIPE_API_BASE": base_url, "WEBHOOK_PORT": str(webhook_port)}
            with running_server(database_url, workdir, run_secrets, extra_env=extra) as server:
                cpu_start, started = server.cpu_seconds(), time.monotonic()
                tally = asyncio.run(load(server.target, run_secrets.jwt_secret, base_url, args))
                wall_s = time.monotonic() - started
                cpu_s = server.cpu_seconds() - cpu_start
                settle_start = time.monotonic()
                while (left := unsettled(database_url)) != (0, 0):
                    if time.monotonic() - settle_start > SETTLE_TIMEOUT_S:
                        break
                    time.sleep(0.5)
                settle_s = time.monotonic() - settle_start
                warnings = server.log_messages(5)
            env = {**os.environ, **extra, **run_secrets.env(), "DATABASE_URL": database_url}
            env |= {"LOG_LEVEL": "WARNING", "DATA_DIR": str(workdir / "data")}
            found = reconcile(env, since)
            final = statuses(database_url)
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in (*workdir.glob("server-*.log"), workdir / "sim.log"):
                shutil.copy(log, args.logs / log.name)
    print(f"gateway mix on {args.db}: {args.concurrency} clients, {args.duration:.0f} s")
    _report(tally, wall_s)
    print(f"server CPU {cpu_s:.1f} s ({cpu_s / wall_s:.0%} of one core)")
    print(f"in flight when the load stopped, settled after {settle_s:.1f} s: left {left}")
    print("final:", final)
    print("server warnings:", warnings)
    print(f"reconcile: {found['count']} mismatch(es)")
    for mismatch in found["mismatches"][:20]:
        print("  ", mismatch)
    passed = found["count"] == 0 and left == (0, 0)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
