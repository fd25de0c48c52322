"""A deliberate ceiling on open server streams (WatchPaymentStatus) per process.

Past the ceiling a new stream is answered RESOURCE_EXHAUSTED with RetryInfo before its
handler runs (clients retry it, possibly on another replica), never left to gRPC core's
pending queue, which cancels calls at random when it overflows (CANCELLED, not retried).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from payment_grpc.api.errors import abort_with, build_status
from payment_grpc.api.interceptors.wrapping import (
    Handler,
    MethodInterceptor,
    Streaming,
    unchanged,
    wrap_handler,
)

RETRY_AFTER_S = 1.0

TOO_MANY_STREAMS = build_status(
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "this replica has as many open streams as it serves; retry",
    "TOO_MANY_STREAMS",
    retry_after_s=RETRY_AFTER_S,
)


class StreamLimitInterceptor(MethodInterceptor):
    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.open_streams = 0

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        return wrap_handler(handler, unchanged, lambda behavior: _Limited(self, behavior).run)


class _Limited:
    """One stream through the limit (a bound method of this is its handler: 2 objects
    while it is open, where a closure kept 4)."""

    __slots__ = ("_behavior", "_limit")

    def __init__(self, limit: StreamLimitInterceptor, behavior: Streaming) -> None:
        self._limit = limit
        self._behavior = behavior

    async def run(self, request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        limit = self._limit
        if limit.open_streams >= limit.max_streams:
            await abort_with(context, TOO_MANY_STREAMS)
        limit.open_streams += 1  # one event loop: no lock needed
        try:
            async for item in self._behavior(request, context):
                yield item
        finally:
            limit.open_streams -= 1
