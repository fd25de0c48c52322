"""Per-caller rate limit (token bucket) on PaymentService; health is never limited.

In-process buckets: with N replicas behind a Service the effective limit is about N times
the configured one, which is the intended safety net against one runaway caller, not a
billing quota.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from payment_grpc.api.context import current_request
from payment_grpc.api.errors import build_status
from payment_grpc.api.interceptors.guard import abort_with
from payment_grpc.api.interceptors.wrapping import (
    ServerInterceptor,
    Streaming,
    Unary,
    wrap_handler,
)

MAX_TRACKED_CALLERS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, caller: str, now: float) -> float:
        """0 if the call may proceed, else seconds until a token is available."""
        bucket = self._buckets.pop(caller, None) or _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        self._buckets[caller] = bucket
        if len(self._buckets) > MAX_TRACKED_CALLERS:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self._rate


class RateLimitInterceptor(ServerInterceptor):
    def __init__(self, buckets: TokenBuckets) -> None:
        self._buckets = buckets

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/payments.v1."):
            return handler

        async def admit(context: aio.ServicerContext[Any, Any]) -> None:
            wait_s = self._buckets.take(current_request.get().subject, time.monotonic())
            if wait_s:
                await abort_with(
                    context,
                    build_status(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "rate limit exceeded for this caller",
                        "RATE_LIMITED",
                        retry_after_s=max(wait_s, 0.001),
                    ),
                )

        def unary(behavior: Unary) -> Unary:
            async def limited(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                await admit(context)
                return await behavior(request, context)

            return limited

        def streaming(behavior: Streaming) -> Streaming:
            async def limited(
                request: Any, context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await admit(context)
                async for item in behavior(request, context):
                    yield item

            return limited

        return wrap_handler(handler, unary, streaming)
