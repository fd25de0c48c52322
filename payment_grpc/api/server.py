"""The gRPC server: servicer + interceptors + health + reflection + graceful stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from payments.v1 import admin_service_pb2_grpc, payment_service_pb2_grpc

from payment_grpc.api.admin_servicer import AdminServicer
from payment_grpc.api.interceptors.observability import InFlight
from payment_grpc.api.interceptors.wrapping import SendsEncoded, ServerInterceptor, chained
from payment_grpc.api.methods import ADMIN_SERVICE_NAME, SERVICE_NAME
from payment_grpc.api.servicer import PaymentServicer
from payment_grpc.api.streams import StreamDrain
from payment_grpc.tasks import stop_task

log = logging.getLogger(__name__)

# Liveness: "" answers SERVING while the process runs (never the database: an outage
# must not restart every pod). Readiness: each service name follows its checks.
LIVENESS_NAME = ""
READINESS_NAMES = (SERVICE_NAME,)
HEALTH_NAMES = (LIVENESS_NAME, *READINESS_NAMES)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNREQUESTED_CALL_LIMIT_S = 600  # longer than any deadline a caller of ours sets


def pending_call_limits(max_streams: int) -> list[tuple[str, int]]:
    """gRPC core queues calls that arrive faster than the event loop accepts them; past
    1000 queued (its default) it cancels arrivals at random, and a call queued for 30 s is
    cancelled too: 2,000 watchers opened at once lost 10-60% as CANCELLED, which clients
    do not retry. The queue holds every stream our own limit admits, with room for the
    unary calls arriving at the same moment, and a queued call waits until the caller's
    own deadline says it is too late (clients see DEADLINE_EXCEEDED, not CANCELLED)."""
    soft = max(2 * max_streams, 1000)
    return [
        ("grpc.server.max_pending_requests", soft),
        ("grpc.server.max_pending_requests_hard_limit", 2 * soft),
        ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_CALL_LIMIT_S),
    ]


ReadinessCheck = Callable[[], Awaitable[bool]]


class PaymentServer:
    """Owns the aio server and its health; `stop()` is the graceful shutdown."""

    def __init__(
        self,
        servicer: PaymentServicer,
        *,
        admin_servicer: AdminServicer,
        dependencies_healthy: Callable[[], Awaitable[bool]],
        health_interval_s: float,
        max_message_bytes: int,
        max_metadata_bytes: int,
        max_streams: int = 10_000,
        interceptors: Sequence[ServerInterceptor],
        calls: InFlight,
        streams: StreamDrain,
        reuse_port: bool = False,
    ) -> None:
        """`interceptors` in call order (the first sees the call first), composed in
        bootstrap.py; among them `streams`, which `stop()` closes, and the one that counts
        `calls` in flight. `reuse_port`: sibling worker processes share the port
        (WORKERS > 1); otherwise a taken port is an error, not a silent second server."""
        self.metrics = calls  # calls in flight, for the shutdown warning
        self.health = HealthServicer()
        self._readiness_checks: list[ReadinessCheck] = [dependencies_healthy]
        self._streams = streams
        self._health_interval_s = health_interval_s
        self._monitor: asyncio.Task[None] | None = None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_metadata_size", max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", max_metadata_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
            *pending_call_limits(max_streams),
        ]
        innermost = SendsEncoded(servicer.SENDS_ENCODED)  # how the servicer answers
        self.server = aio.server(interceptors=chained([*interceptors, innermost]), options=options)
        payment_service_pb2_grpc.add_PaymentServiceServicer_to_server(servicer, self.server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(admin_servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)  # type: ignore[no-untyped-call]
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                ADMIN_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )

    def bind(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Plaintext, or TLS-only with `credentials` (mutual TLS if they require a client
        certificate)."""
        if credentials is not None:
            return self.server.add_secure_port(address, credentials)
        return self.server.add_insecure_port(address)

    def add_readiness_check(self, check: ReadinessCheck) -> None:
        """Readiness is SERVING only while every check answers True (the database is
        the first; e.g. a gateway circuit breaker can add itself). Call before start()."""
        self._readiness_checks.append(check)

    async def start(self) -> None:
        await self.server.start()
        await self.health.set(LIVENESS_NAME, SERVING)
        await self._set_readiness(await self._ready())
        self._monitor = asyncio.create_task(self._watch_readiness())

    async def _ready(self) -> bool:
        return all([await check() for check in self._readiness_checks])

    async def _set_readiness(self, ready: bool) -> None:
        for name in READINESS_NAMES:
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def _watch_readiness(self) -> None:
        last = None
        while True:
            ready = await self._ready()
            if ready != last:
                if ready:
                    log.info("dependencies healthy: ready")
                else:
                    log.warning("dependencies UNHEALTHY: readiness answers NOT_SERVING")
                await self._set_readiness(ready)
                last = ready
            await asyncio.sleep(self._health_interval_s)

    async def stop(self, grace_s: float, drain_s: float = 0.0) -> None:
        """Readiness NOT_SERVING first; for `drain_s` the listener still accepts (load
        balancers and Envoy see the change and move traffic away); then refuse new calls,
        end open streams with UNAVAILABLE and let in-flight calls finish within
        `grace_s`. Liveness stays SERVING until the process exits."""
        await stop_task(self._monitor)
        await self._set_readiness(False)
        if drain_s > 0:
            log.info("readiness NOT_SERVING; still accepting calls for %ss", drain_s)
            await asyncio.sleep(drain_s)
        self._streams.close()
        stopping = asyncio.ensure_future(self.server.stop(grace_s))
        await asyncio.sleep(0)  # let stop() close the listeners before we say so
        log.info("no longer accepting calls; draining in-flight calls for up to %ss", grace_s)
        await stopping
        if self.metrics.in_flight:  # cut by the grace: their finally blocks run after this
            log.warning(
                "shutdown grace of %ss ran out: %d calls cancelled",
                grace_s,
                self.metrics.in_flight,
            )

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def health_check_names() -> tuple[str, ...]:
    return HEALTH_NAMES


__all__ = ["PaymentServer", "grpc"]
