"""The gRPC server: servicer + interceptors + health + reflection + graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from payments.v1 import payment_service_pb2, payment_service_pb2_grpc

from payment_grpc.api.interceptors.guard import GuardInterceptor
from payment_grpc.api.interceptors.observability import ObservabilityInterceptor, RpcMetrics
from payment_grpc.api.servicer import PaymentServicer

log = logging.getLogger(__name__)

SERVICE_NAME = payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name
HEALTH_NAMES = ("", SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class PaymentServer:
    """Owns the aio server and its health; `stop()` is the graceful shutdown."""

    def __init__(
        self,
        servicer: PaymentServicer,
        *,
        dependencies_healthy: Callable[[], Awaitable[bool]],
        health_interval_s: float,
        max_message_bytes: int,
        max_metadata_bytes: int,
        extra_interceptors: Sequence[aio.ServerInterceptor[Any, Any]] = (),
        inner_interceptors: Sequence[aio.ServerInterceptor[Any, Any]] = (),
        reuse_port: bool = False,
    ) -> None:
        """`extra_interceptors` run before validation (auth, rate limits);
        `inner_interceptors` after it, next to the handler (idempotency). `reuse_port`:
        sibling worker processes share the port (WORKERS > 1); otherwise a taken port is
        an error, not a silent second server."""
        self.metrics = RpcMetrics()
        self.health = HealthServicer()
        self._dependencies_healthy = dependencies_healthy
        self._health_interval_s = health_interval_s
        self._monitor: asyncio.Task[None] | None = None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_metadata_size", max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", max_metadata_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
        ]
        self.server = aio.server(
            interceptors=[
                ObservabilityInterceptor(self.metrics),
                *extra_interceptors,
                GuardInterceptor(),
                *inner_interceptors,
            ],
            options=options,
        )
        payment_service_pb2_grpc.add_PaymentServiceServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)  # type: ignore[no-untyped-call]
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
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

    async def start(self) -> None:
        await self.server.start()
        await self._refresh_health()
        self._monitor = asyncio.create_task(self._watch_dependencies())

    async def _refresh_health(self) -> None:
        status = SERVING if await self._dependencies_healthy() else NOT_SERVING
        for name in HEALTH_NAMES:
            await self.health.set(name, status)

    async def _watch_dependencies(self) -> None:
        last = None
        while True:
            healthy = await self._dependencies_healthy()
            if healthy != last:
                if healthy:
                    log.info("dependencies healthy: serving")
                else:
                    log.warning("dependencies UNHEALTHY: health answers NOT_SERVING")
                for name in HEALTH_NAMES:
                    await self.health.set(name, SERVING if healthy else NOT_SERVING)
                last = healthy
            await asyncio.sleep(self._health_interval_s)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING first, then refuse new calls and let in-flight ones finish."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace_s))
        await asyncio.sleep(0)  # let stop() close the listeners before we say so
        log.info("no longer accepting calls; draining in-flight calls for up to %ss", grace_s)
        await stopping

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def health_check_names() -> tuple[str, ...]:
    return HEALTH_NAMES


__all__ = ["PaymentServer", "grpc"]
