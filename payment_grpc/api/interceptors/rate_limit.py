"""Per-caller rate limit (token bucket) on PaymentService; health is never limited.

In-process buckets: with N replicas behind a Service the effective limit is about N times
the configured one, which is the intended safety net against one runaway caller, not a
billing quota.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from payment_grpc.api.context import current_request
from payment_grpc.api.errors import build_status
from payment_grpc.api.interceptors.wrapping import CheckFirst

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


def rate_limited(wait_s: float) -> grpc.Status:
    return build_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate limit exceeded for this caller",
        "RATE_LIMITED",
        retry_after_s=max(wait_s, 0.001),
    )


class RateLimitInterceptor(CheckFirst):
    def __init__(self, buckets: TokenBuckets) -> None:
        self._buckets = buckets

    async def check(
        self, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> grpc.Status | None:
        wait_s = self._buckets.take(current_request.get().subject, time.monotonic())
        return rate_limited(wait_s) if wait_s else None
