"""Server streams that end promptly at shutdown.

`StreamDrain` ends every open PaymentService stream with UNAVAILABLE when the server
stops accepting calls, instead of letting the grace period run out on them: clients
resume with `from_sequence`. (Heartbeats on a quiet watch come from the watch itself:
Queries.watch yields None when its wait for a change times out.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
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

SHUTTING_DOWN = build_status(
    grpc.StatusCode.UNAVAILABLE,
    "this server is shutting down: reconnect and resume with from_sequence",
    "SERVER_SHUTTING_DOWN",
    retry_after_s=0.1,
)


class StreamDrain(MethodInterceptor):
    """Ends open PaymentService streams with UNAVAILABLE SERVER_SHUTTING_DOWN once
    `close()` is called; streams opened afterwards end the same way at once.

    A stream waiting for its next message is cancelled (gRPC's own task for the call):
    the CancelledError ends the handler's generators, their clean-up included, and is
    taken back here (`uncancel`) to answer UNAVAILABLE instead. A stream whose message
    is being written ends right after the write. Nothing is kept per stream but its
    entry in a set while it waits: racing each message against a stop future took a
    task and an `asyncio.wait` per message, and ~20 objects per open stream for the
    garbage collector to walk (10,000 streams open: gen2 pauses of over a second).
    A cancel that is not ours (the client went away, the grace ran out) stays one."""

    def __init__(self) -> None:
        self._closing = False
        self._waiting: set[asyncio.Task[Any]] = set()  # streams inside their handler
        self._cut: set[asyncio.Task[Any]] = set()  # cancelled by close()

    def close(self) -> None:
        self._closing = True
        for task in self._waiting:
            if task.cancel():
                self._cut.add(task)

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        return wrap_handler(handler, unchanged, lambda behavior: _Drained(self, behavior).run)

    def _ours(self, task: asyncio.Task[Any]) -> bool:
        """Whether close() cancelled `task` (and no one else did): taken back if so."""
        if task not in self._cut:
            return False
        self._cut.discard(task)
        return task.uncancel() == 0


class _Drained:
    """One stream under the drain (a bound method of this is its handler: 2 objects
    while it is open, where a closure kept 4)."""

    __slots__ = ("_behavior", "_drain")

    def __init__(self, drain: StreamDrain, behavior: Streaming) -> None:
        self._drain = drain
        self._behavior = behavior

    async def run(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        drain = self._drain
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - a handler always runs in a task
            raise RuntimeError("a stream handler outside a task")
        items = self._behavior(request, context)
        try:
            while not drain._closing:
                drain._waiting.add(task)
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not drain._ours(task):
                        raise
                    break
                finally:
                    drain._waiting.discard(task)
                yield item
        finally:
            if task in drain._cut:  # cancelled after its handler stopped on its own
                drain._cut.discard(task)
                task.uncancel()
            if isinstance(items, AsyncGenerator):  # one left at a yield: its finally now
                await items.aclose()
        await abort_with(context, SHUTTING_DOWN)
