"""The service's neighbours for the `charge-events` scenario, and what is measured on them.

- An order service stub (`python -m bench.collaborators --port N`): a grpc.aio + uvloop
  server answering every GetOrder with a payable order of the bench's amount and currency
  (any customer) and acknowledging every NotifyPaymentOutcome. Also handy by hand: point
  ORDER_SERVICE_ADDR at it to try `make run` with an order service.
- The real NATS JetStream (BENCH_NATS_URL, default nats://127.0.0.1:4222), a stream and
  subject prefix of the run's own, deleted afterwards.
- The Stripe-compatible simulator (`payment-grpc gateway-sim`) for `charge-stripe`: the
  service's gateway calls (the `stripe` SDK, HTTP) and the simulator's ledger in a process
  of their own, latency 0, every card authorized.
- Outbox lag: after the load, the rows the run wrote are awaited until delivered (at most
  DRAIN_TIMEOUT_S), then `delivered_at - created_at` per sink (commit -> the sink took it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import sqlalchemy as sa

from bench.scenarios import AMOUNT_MINOR, CURRENCY

NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")
DRAIN_TIMEOUT_S = 60.0
POLL_S = 0.5


async def _serve(port: int) -> None:
    from grpc import aio
    from orders.v1 import order_service_pb2 as orders
    from orders.v1 import order_service_pb2_grpc

    class Stub(order_service_pb2_grpc.OrderServiceServicer):
        async def GetOrder(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
            order = orders.Order(
                order_id=request.order_id,
                currency=CURRENCY,
                total_minor=AMOUNT_MINOR,
                payable=True,
            )
            return orders.GetOrderResponse(order=order)

        async def NotifyPaymentOutcome(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
            return orders.NotifyPaymentOutcomeResponse()

    server = aio.server()
    order_service_pb2_grpc.add_OrderServiceServicer_to_server(Stub(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"order service stub on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(1)


@contextlib.contextmanager
def order_service_stub(port: int, workdir: pathlib.Path) -> Iterator[str]:
    """The stub in a process of its own (its CPU is not the service's); yields its address."""
    log = (workdir / "order-stub.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.collaborators", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(workdir / "order-stub.log", process)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process, log)


STRIPE_SIM_KEY = "sk_test_bench"
SIM_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A collaborator process: the server settings that point at it, and its pid."""

    env: dict[str, str]
    pid: int


@contextlib.contextmanager
def stripe_simulator(workdir: pathlib.Path) -> Iterator[Neighbour]:
    """`payment-grpc gateway-sim` on a free port, no latency, every card authorized; yields
    the GATEWAY=stripe settings for the service."""
    command = [
        sys.executable, "-m", "payment_grpc", "gateway-sim",
        "--port", "0",
        "--api-key", STRIPE_SIM_KEY,
        "--ledger", str(workdir / "stripe-sim-ledger.db"),
        "--seed", "1",
        "--success-rate", "1.0",
    ]  # fmt: skip
    log_path = workdir / "stripe-sim.log"
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=workdir)
    try:
        assert process.stdout is not None
        match = SIM_LISTENING.search(process.stdout.readline().decode(errors="replace"))
        if match is None:
            raise RuntimeError(f"gateway-sim did not start: {log_path.read_text()}")
        env = {
            "GATEWAY": "stripe",
            "STRIPE_API_KEY": STRIPE_SIM_KEY,
            "STRIPE_API_BASE": match.group(1),
        }
        yield Neighbour(env, process.pid)
    finally:
        stop_process(process, log)


def _wait_listening(log_path: pathlib.Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while "order service stub on" not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"order service stub did not start: {log_path.read_text()}")
        time.sleep(0.1)


@dataclass(frozen=True, slots=True)
class OutboxLag:
    """Per sink: messages delivered, still undelivered after the drain wait, lag p50/p99/max
    in ms (commit -> sink acknowledged), and how long the drain took after the load."""

    sink: str
    delivered: int
    undelivered: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    drained_after_s: float

    def line(self) -> str:
        return (
            f"outbox lag {self.sink}: {self.delivered} delivered, {self.undelivered} left,"
            f" p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms"
            f" (drained {self.drained_after_s:.1f} s after the load)"
        )


def _sync_url(database_url: str) -> str:
    return database_url.replace("sqlite+aiosqlite", "sqlite")


def outbox_lag(database_url: str) -> list[OutboxLag]:
    """Waits until the outbox is drained (or DRAIN_TIMEOUT_S), then the lag per sink."""
    from bench.stats import percentile
    from payment_grpc.adapters.db.tables import outbox

    engine = sa.create_engine(_sync_url(database_url))
    started = time.monotonic()
    try:
        pending = sa.select(sa.func.count()).where(outbox.c.state != "delivered")
        with engine.connect() as conn:
            while conn.execute(pending).scalar_one() and (
                time.monotonic() - started < DRAIN_TIMEOUT_S
            ):
                conn.rollback()
                time.sleep(POLL_S)
            drained = time.monotonic() - started
            rows = conn.execute(
                sa.select(outbox.c.sink, outbox.c.state, outbox.c.created_at, outbox.c.delivered_at)
            ).all()
    finally:
        engine.dispose()
    lags: list[OutboxLag] = []
    for sink in sorted({row.sink for row in rows}):
        mine = [row for row in rows if row.sink == sink]
        values = sorted(
            (_aware(row.delivered_at) - _aware(row.created_at)).total_seconds() * 1000
            for row in mine
            if row.delivered_at is not None
        )
        lags.append(
            OutboxLag(
                sink=sink,
                delivered=len(values),
                undelivered=len(mine) - len(values),
                p50_ms=percentile(values, 50),
                p99_ms=percentile(values, 99),
                max_ms=values[-1] if values else float("nan"),
                drained_after_s=drained,
            )
        )
    return lags


def _aware(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def delete_stream(stream: str) -> None:
    async def delete() -> None:
        import nats

        client = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await client.jetstream().delete_stream(stream)
        finally:
            await client.close()

    asyncio.run(delete())


def main() -> None:
    parser = argparse.ArgumentParser(description="order service stub (orders.v1)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(args.port))


def stop_process(process: subprocess.Popen[bytes], log: IO[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not ended within 10 s; its log closed."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


if __name__ == "__main__":
    main()
