"""One load-generating process: N coroutines calling one RPC (a channel per 4 of them).

Every coroutine stops starting calls at the end of the window and every call carries a
deadline, so a worker always finishes within warmup + duration + CALL_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from bench.scenarios import SCENARIOS, Builder, Scenario, WorkerIdentity, prepared_charge
from payment_grpc.adapters.auth.tokens import mint_token

CALL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 15.0
BARRIER_TIMEOUT_S = 60.0
MESSAGE_CHARS = 160
REPLAYED = "idempotent-replayed"
SCOPES = ("payments.charge", "payments.refund", "payments.read")
PREPARE_IN_FLIGHT = 8
CALLS_PER_CHANNEL = 4  # 32 in flight per process: 8 connections, 16 in all
JWT_AUDIENCE = "payment-service"  # the server's defaults (JWT_AUDIENCE, JWT_ISSUER)
JWT_ISSUER = "payment-grpc"
JWT_SUBJECT = "bench"

CallMetadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    target: str
    scenario: str
    concurrency: int
    warmup_s: float
    duration_s: float
    run_tag: str
    jwt_secret: str = field(repr=False)


@dataclass(slots=True)
class WorkerResult:
    """What one worker saw: calls started after warm-up, plus warm-up status codes."""

    latencies_ms: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    payment_ids: set[str] = field(default_factory=set)
    warmup_codes: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)  # error details, warm-up too
    replayed: int = 0
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

    def add(self, started: float, code: grpc.StatusCode, reply: Any) -> None:
        if started < self.window.measure_from:
            self.result.warmup_codes[code.name] += 1
            return
        self.result.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.result.codes[code.name] += 1
        if reply is None or not reply.HasField("payment"):
            return
        self.result.statuses[pb.PaymentStatus.Name(reply.payment.status)] += 1
        self.result.payment_ids.add(reply.payment.payment_id)

    def count_replay(self, started: float, initial_metadata: aio.Metadata) -> None:
        """Counts OK answers the server marked as replays of a stored answer."""
        if started >= self.window.measure_from and initial_metadata.get(REPLAYED) == "true":
            self.result.replayed += 1


@dataclass(frozen=True, slots=True)
class Load:
    """What every client coroutine of a worker shares."""

    method: Any  # the stub's multi-callable for the scenario's RPC
    build: Builder
    who: WorkerIdentity
    prepared: tuple[str, ...]
    credentials: CallMetadata


def _metadata(credentials: CallMetadata, idempotency_key: str | None) -> CallMetadata:
    if idempotency_key is None:
        return credentials
    return (*credentials, ("idempotency-key", idempotency_key))


async def _client(load: Load, counter: itertools.count[int], recorder: Recorder) -> None:
    while time.perf_counter() < recorder.window.end:
        call = load.build(load.who, next(counter), load.prepared)
        metadata = _metadata(load.credentials, call.idempotency_key)
        started = time.perf_counter()
        rpc = load.method(call.request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        try:
            reply = await rpc
        except aio.AioRpcError as exc:
            recorder.add(started, exc.code(), None)
            recorder.result.messages[f"{exc.code().name}: {exc.details()}"[:MESSAGE_CHARS]] += 1
        else:
            recorder.add(started, grpc.StatusCode.OK, reply)
            recorder.count_replay(started, await rpc.initial_metadata())


async def _prepare(
    stub: payment_service_pb2_grpc.PaymentServiceAsyncStub,
    scenario: Scenario,
    who: WorkerIdentity,
    credentials: CallMetadata,
) -> tuple[str, ...]:
    """Charges the scenario's captured payments (a few at a time) before the barrier."""
    limit = asyncio.Semaphore(PREPARE_IN_FLIGHT)
    build = scenario.prepare or prepared_charge

    async def one(n: int) -> str:
        call = build(who, n, ())
        async with limit:
            reply = await stub.Charge(
                call.charge,
                metadata=_metadata(credentials, call.idempotency_key),
                timeout=CALL_TIMEOUT_S,
            )
        if reply.payment.status != pb.PAYMENT_STATUS_CAPTURED:
            raise RuntimeError(f"prepared payment not captured: {reply.payment.status}")
        return str(reply.payment.payment_id)

    return tuple(await asyncio.gather(*(one(n) for n in range(scenario.prepare_payments))))


async def _load(config: WorkerConfig, barrier: Any) -> WorkerResult:
    # One HTTP/2 connection per CALLS_PER_CHANNEL in flight (a distinct channel_id, or
    # gRPC shares one connection between the channels): with WORKERS=2 the kernel hands
    # each connection to one server process (SO_REUSEPORT hashes the 4-tuple), so two
    # connections landed both on one process in about half the runs and that run measured
    # one process (with 8 connections in all: 6 on one, 2 on the other); 16 in all keep
    # the split near even; and the 1,000 calls of slow-gateway must not queue behind a peer's
    # max-concurrent-streams.
    channels = [
        aio.insecure_channel(config.target, options=[("grpc.channel_id", n)])
        for n in range(math.ceil(config.concurrency / CALLS_PER_CHANNEL))
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        stubs = [payment_service_pb2_grpc.PaymentServiceStub(c) for c in channels]
        scenario = SCENARIOS[config.scenario]
        who = WorkerIdentity(os.getpid(), config.run_tag)
        credentials = _credentials(config.jwt_secret)
        prepared = await _prepare(stubs[0], scenario, who, credentials)
        loads = [
            Load(getattr(stub, scenario.rpc), scenario.build, who, prepared, credentials)
            for stub in stubs
        ]
        await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT_S)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        window = Window(start + config.warmup_s, start + config.warmup_s + config.duration_s)
        recorder = Recorder(window)
        counter = itertools.count()
        await asyncio.gather(
            *(_client(loads[i % len(loads)], counter, recorder) for i in range(config.concurrency))
        )
        recorder.result.cpu_s = _cpu_seconds() - cpu_start
        return recorder.result
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def _credentials(jwt_secret: str) -> CallMetadata:
    """A bearer token with the scopes of every scenario. All workers are one caller (one subject):
    idempotency keys are scoped per caller, and `storm` is one caller's duplicates."""
    token = mint_token(
        jwt_secret,
        subject=JWT_SUBJECT,
        scopes=SCOPES,
        audience=JWT_AUDIENCE,
        issuer=JWT_ISSUER,
    )
    return (("authorization", f"Bearer {token}"),)


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
    results.put(result)
