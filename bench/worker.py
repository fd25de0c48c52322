"""One load-generating process: one grpc.aio channel, N coroutines calling Charge.

Every coroutine stops starting calls at the end of the window and every call carries a
deadline, so a worker always finishes within warmup + duration + CALL_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from bench.scenarios import SCENARIOS, Builder, WorkerIdentity

CALL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 15.0
BARRIER_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    target: str
    scenario: str
    concurrency: int
    warmup_s: float
    duration_s: float
    run_tag: str


@dataclass(slots=True)
class WorkerResult:
    """What one worker saw inside the measured window (calls started after warm-up)."""

    latencies_ms: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    payment_ids: set[str] = field(default_factory=set)
    warmup_calls: int = 0
    cpu_s: float = 0.0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Window:
    measure_from: float
    end: float


class Recorder:
    def __init__(self, window: Window) -> None:
        self.window = window
        self.result = WorkerResult()

    def add(self, started: float, code: grpc.StatusCode, reply: api.ChargeResponse | None) -> None:
        if started < self.window.measure_from:
            self.result.warmup_calls += 1
            return
        self.result.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.result.codes[code.name] += 1
        if reply is None:
            return
        self.result.statuses[pb.PaymentStatus.Name(reply.payment.status)] += 1
        self.result.payment_ids.add(reply.payment.payment_id)


async def _client(
    stub: payment_service_pb2_grpc.PaymentServiceAsyncStub,
    build: Builder,
    who: WorkerIdentity,
    counter: itertools.count[int],
    recorder: Recorder,
) -> None:
    while time.perf_counter() < recorder.window.end:
        call = build(who, next(counter))
        metadata = (("idempotency-key", call.idempotency_key),)
        started = time.perf_counter()
        try:
            reply = await stub.Charge(call.request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except aio.AioRpcError as exc:
            recorder.add(started, exc.code(), None)
        else:
            recorder.add(started, grpc.StatusCode.OK, reply)


async def _load(config: WorkerConfig, barrier: Any) -> WorkerResult:
    async with aio.insecure_channel(config.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT_S)
        start = time.perf_counter()
        window = Window(start + config.warmup_s, start + config.warmup_s + config.duration_s)
        recorder = Recorder(window)
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        who = WorkerIdentity(os.getpid(), config.run_tag)
        build, counter = SCENARIOS[config.scenario].build, itertools.count()
        clients = [_client(stub, build, who, counter, recorder) for _ in range(config.concurrency)]
        await asyncio.gather(*clients)
        return recorder.result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_worker(config: WorkerConfig, barrier: Any, results: Any) -> None:
    """Process entry point (spawn): puts exactly one WorkerResult on `results`."""
    try:
        result = asyncio.run(_load(config, barrier))
    except Exception as exc:
        barrier.abort()  # release the others now instead of at BARRIER_TIMEOUT_S
        result = WorkerResult(error=f"{type(exc).__name__}: {exc!r}")
    result.cpu_s = _cpu_seconds()
    results.put(result)
