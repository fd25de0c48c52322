"""Structured logs and metrics for every RPC, with the real status code (rich errors
sent with abort_with_status included), and the call's trace id for the use cases."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from payment_grpc.api.context import current_request
from payment_grpc.api.interceptors.wrapping import (
    ServerInterceptor,
    Streaming,
    Unary,
    wrap_handler,
)
from payment_grpc.service.context import RequestContext

log = logging.getLogger("payment_grpc.rpc")
# W3C trace context; anything else is ignored (the trace id is logged and stored).
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


class RpcMetrics:
    """Counters by (method, code) and a latency sum: enough for a first dashboard."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.latency_s: defaultdict[str, float] = defaultdict(float)
        self.in_flight = 0  # calls started and not finished (the shutdown grace counts them)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.calls[(method, code)] += 1
        self.latency_s[method] += seconds


def _trace_id(metadata: tuple[Any, ...] | None) -> str:
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            match = _TRACEPARENT.match(value)
            if match and match.group(1) != "0" * 32:
                return match.group(1)
    return secrets.token_hex(16)


def _code(context: aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "OK" if code in (None, 0) else str(code)


class ObservabilityInterceptor(ServerInterceptor):
    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        trace_id = _trace_id(details.invocation_metadata)

        def start(context: aio.ServicerContext[Any, Any]) -> float:
            current_request.set(RequestContext(trace_id=trace_id))
            log.debug("rpc started", extra={"rpc_method": method, "trace_id": trace_id})
            self._metrics.in_flight += 1
            return time.perf_counter()

        def finish(context: aio.ServicerContext[Any, Any], started: float) -> None:
            elapsed = time.perf_counter() - started
            self._metrics.in_flight -= 1
            code = _code(context)
            self._metrics.observe(method, code, elapsed)
            log.info(
                "rpc finished",
                extra={
                    "rpc_method": method,
                    "grpc_code": code,
                    "duration_ms": round(elapsed * 1000, 2),
                    "trace_id": trace_id,
                },
            )

        def unary(behavior: Unary) -> Unary:
            async def observed(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                started = start(context)
                try:
                    return await behavior(request, context)
                finally:
                    finish(context, started)

            return observed

        def streaming(behavior: Streaming) -> Streaming:
            async def observed(
                request: Any, context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                started = start(context)
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    finish(context, started)

            return observed

        return wrap_handler(handler, unary, streaming)
