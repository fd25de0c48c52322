"""WatchPaymentStatus at scale: N open streams on one server process, RSS and fan-out.

The coordinator authorizes `payments` payments (manual capture), then `--processes`
watcher processes open N streams between them, spread over those payments, and wait for
each stream's snapshot. With every stream open the server's RSS is taken; then the
coordinator captures the payments (10 at a time) and each watcher records when the
CAPTURED event reached each of its streams. Fan-out latency is from the start of the
CapturePayment call to a watcher's receipt (CLOCK_MONOTONIC is machine-wide), so it
includes the capture itself: an upper bound of the bus's delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from bench.scenarios import charge_request
from bench.server import RunningServer
from bench.stats import percentile
from bench.worker import CALL_TIMEOUT_S, CONNECT_TIMEOUT_S, _credentials

CHANNELS_PER_PROCESS = 10  # HTTP/2 connections; each carries streams / channels streams
CAPTURES_IN_FLIGHT = 10
OPEN_TIMEOUT_S = 300.0
EVENT_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class WatchConfig:
    target: str
    payment_ids: tuple[str, ...]
    streams: int
    first_stream: int  # this process watches streams first_stream .. first_stream+streams-1
    jwt_secret: str = field(repr=False)


@dataclass(slots=True)
class WatchResult:
    arrivals: list[tuple[str, float]] = field(default_factory=list)  # (payment id, monotonic)
    opened: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    error: str = ""


@dataclass(slots=True)
class StreamsSummary:
    streams: int
    opened: int
    events: int
    payments: int
    rss_before_bytes: int
    rss_open_bytes: int
    fanout_p50_ms: float
    fanout_p99_ms: float
    fanout_max_ms: float
    failures: dict[str, int]
    open_s: float = 0.0  # from the watchers' start until every stream had its snapshot
    capture_s: float = 0.0  # from the first capture's start until the last event arrived
    server_cpu_open_s: float = 0.0  # the server's CPU in each of those two phases
    server_cpu_fanout_s: float = 0.0
    # The slowest captures, (their place in capture order, their slowest delivery in ms):
    # p99 is about the slowest one or two of 100 captures, so which ones (the first, still
    # cold? one in the middle, a pause?) says what the tail is.
    slowest_captures: list[tuple[int, float]] = field(default_factory=list)

    def row(self) -> str:
        return (
            f"| streams | {self.streams} | opened {self.opened} | events {self.events} "
            f"| RSS MB {self.rss_before_bytes / 2**20:.0f} -> {self.rss_open_bytes / 2**20:.0f}"
            f" | fan-out p50 {self.fanout_p50_ms:.0f} ms, p99 {self.fanout_p99_ms:.0f} ms, "
            f"max {self.fanout_max_ms:.0f} ms | failures {self.failures or 0} "
            f"| opening {self.open_s:.1f} s (server CPU {self.server_cpu_open_s:.1f} s), "
            f"captures + fan-out {self.capture_s:.1f} s (server CPU "
            f"{self.server_cpu_fanout_s:.1f} s) | slowest captures (#, max ms) "
            + ", ".join(f"#{n} {ms:.0f}" for n, ms in self.slowest_captures)
            + " |"
        )


async def _watch_one(
    stub: payment_service_pb2_grpc.PaymentServiceAsyncStub,
    payment_id: str,
    credentials: Any,
    opened: asyncio.Event,
    counter: list[int],
    goal: int,
    result: WatchResult,
) -> None:
    stream = stub.WatchPaymentStatus(
        api.WatchPaymentStatusRequest(payment_id=payment_id), metadata=credentials
    )
    first = True

    def settled() -> None:
        """Counts this stream once: its snapshot, or the error it was answered with.
        Heartbeats (a stream quiet for WATCH_HEARTBEAT_SECONDS) must not count again."""
        nonlocal first
        if first:
            first = False
            counter[0] += 1
            if counter[0] == goal:
                opened.set()

    try:
        async for reply in stream:
            if reply.event.status == pb.PAYMENT_STATUS_CAPTURED:
                result.arrivals.append((payment_id, time.monotonic()))
                return
            if reply.HasField("event"):
                result.opened += first
                settled()
    except aio.AioRpcError as exc:
        result.failures[exc.code().name] = result.failures.get(exc.code().name, 0) + 1
        settled()  # so the run does not wait for it


async def _watch(config: WatchConfig, barrier: Any) -> WatchResult:
    result = WatchResult()
    credentials = _credentials(config.jwt_secret)
    channels = [
        aio.insecure_channel(config.target, options=[("grpc.channel_id", uuid.uuid4().hex)])
        for _ in range(CHANNELS_PER_PROCESS)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        stubs = [payment_service_pb2_grpc.PaymentServiceStub(c) for c in channels]
        opened, counter = asyncio.Event(), [0]
        tasks = [
            asyncio.create_task(
                _watch_one(
                    stubs[i % len(stubs)],
                    config.payment_ids[(config.first_stream + i) % len(config.payment_ids)],
                    credentials,
                    opened,
                    counter,
                    config.streams,
                    result,
                )
            )
            for i in range(config.streams)
        ]
        await asyncio.wait_for(opened.wait(), OPEN_TIMEOUT_S)
        await asyncio.to_thread(barrier.wait, OPEN_TIMEOUT_S)  # all open: RSS, then captures
        await asyncio.wait_for(asyncio.gather(*tasks), EVENT_TIMEOUT_S)
    finally:
        for channel in channels:
            await channel.close(None)
    return result


def run_watcher(config: WatchConfig, barrier: Any, results: Any) -> None:
    try:
        result = asyncio.run(_watch(config, barrier))
    except Exception as exc:
        barrier.abort()
        result = WatchResult(error=f"{type(exc).__name__}: {exc!r}")
    results.put(result)


async def _authorize(target: str, jwt_secret: str, run_tag: str, count: int) -> list[str]:
    credentials = _credentials(jwt_secret)
    async with aio.insecure_channel(target) as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        limit = asyncio.Semaphore(CAPTURES_IN_FLIGHT)

        async def one(n: int) -> str:
            request = charge_request(f"bench-watch-{run_tag}-{n}")
            request.capture_method = pb.CAPTURE_METHOD_MANUAL
            metadata = (*credentials, ("idempotency-key", str(uuid.uuid4())))
            async with limit:
                reply = await stub.Charge(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            return str(reply.payment.payment_id)

        return list(await asyncio.gather(*(one(n) for n in range(count))))


async def _capture_all(
    target: str, jwt_secret: str, payment_ids: list[str], interval_s: float
) -> dict[str, float]:
    """Captures every payment; returns each CapturePayment call's start (monotonic).
    `interval_s` > 0: one capture every interval_s (each event's fan-out on its own);
    0: as fast as CAPTURES_IN_FLIGHT at a time allow (a burst of events)."""
    credentials = _credentials(jwt_secret)
    started: dict[str, float] = {}
    async with aio.insecure_channel(target) as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        limit = asyncio.Semaphore(CAPTURES_IN_FLIGHT)

        async def one(n: int, payment_id: str) -> None:
            metadata = (*credentials, ("idempotency-key", str(uuid.uuid4())))
            await asyncio.sleep(n * interval_s)
            async with limit:
                started[payment_id] = time.monotonic()
                await stub.CapturePayment(
                    api.CapturePaymentRequest(payment_id=payment_id),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT_S,
                )

        await asyncio.gather(*(one(n, p) for n, p in enumerate(payment_ids)))
    return started


def run_streams(
    server: RunningServer,
    jwt_secret: str,
    streams: int,
    payments: int,
    processes: int,
    capture_interval_s: float = 0.0,
) -> StreamsSummary:
    run_tag = uuid.uuid4().hex[:12]
    payment_ids = asyncio.run(_authorize(server.target, jwt_secret, run_tag, payments))
    rss_before = server.rss_bytes()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    share = streams // processes
    watchers = [
        ctx.Process(
            target=run_watcher,
            args=(
                WatchConfig(server.target, tuple(payment_ids), share, i * share, jwt_secret),
                barrier,
                results,
            ),
            daemon=True,
        )
        for i in range(processes)
    ]
    open_start, cpu_start = time.monotonic(), server.cpu_seconds()
    for watcher in watchers:
        watcher.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(OPEN_TIMEOUT_S)
    open_end, cpu_open = time.monotonic(), server.cpu_seconds()
    rss_open = server.rss_bytes()
    started = asyncio.run(_capture_all(server.target, jwt_secret, payment_ids, capture_interval_s))
    collected: list[WatchResult] = [results.get(timeout=EVENT_TIMEOUT_S) for _ in watchers]
    cpu_end = server.cpu_seconds()
    for watcher in watchers:
        watcher.join(timeout=10)
    arrivals = [(p, arrived) for r in collected for p, arrived in r.arrivals]
    order = {p: n for n, p in enumerate(sorted(started, key=started.__getitem__), start=1)}
    worst: dict[str, float] = {}
    for p, arrived in arrivals:
        worst[p] = max(worst.get(p, 0.0), (arrived - started[p]) * 1000)
    slowest = sorted(((order[p], ms) for p, ms in worst.items()), key=lambda c: -c[1])[:5]
    latencies = sorted((arrived - started[p]) * 1000 for p, arrived in arrivals)
    last_arrival = max((arrived for _, arrived in arrivals), default=open_end)
    failures: dict[str, int] = {}
    for r in collected:
        for code, n in r.failures.items():
            failures[code] = failures.get(code, 0) + n
        if r.error:
            failures[r.error[:120]] = failures.get(r.error[:120], 0) + 1
    return StreamsSummary(
        streams=share * processes,
        opened=sum(r.opened for r in collected),
        events=len(latencies),
        payments=payments,
        rss_before_bytes=rss_before,
        rss_open_bytes=rss_open,
        fanout_p50_ms=percentile(latencies, 50),
        fanout_p99_ms=percentile(latencies, 99),
        fanout_max_ms=latencies[-1] if latencies else float("nan"),
        failures=failures,
        open_s=open_end - open_start,
        capture_s=last_arrival - min(started.values(), default=open_end),
        server_cpu_open_s=cpu_open - cpu_start,
        server_cpu_fanout_s=cpu_end - cpu_open,
        slowest_captures=slowest,
    )
