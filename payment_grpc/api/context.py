"""What interceptors publish for the current call, read-only, to the servicer: the
caller's RequestContext and, for a keyed call, its KeyedExecution. Interceptors set
these context variables; the servicer only reads them (and never imports interceptors)."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from google.protobuf.message import Message
from grpc import aio

from payment_grpc.service.context import RequestContext, call_deadline
from payment_grpc.service.idempotency import Checkpoint

T = TypeVar("T")
M = TypeVar("M", bound=Message)

# Set by interceptors (auth, tracing) for the current call; anonymous by default.
current_request: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "current_request",
    default=RequestContext(),  # noqa: B039 - frozen dataclass, immutable
)


def request_context(context: aio.ServicerContext[Any, Any]) -> RequestContext:
    return current_request.get()


class Response:
    """The response of one keyed call, converted once: the checkpoint stores its
    serialization as the key's answer, and the servicer returns the same message."""

    def __init__(self, build: Callable[[Any], Message]) -> None:
        self._build = build
        self._built: tuple[object, Message] | None = None

    def encode(self, result: object) -> bytes:
        """The stored answer for `result` (the checkpoint's encoder)."""
        return self._message(result).SerializeToString(deterministic=True)

    def message(self, build: Callable[[T], M], result: T) -> M:
        """The response for `result`: the one already encoded for it, else built now.
        `build` names the call's builder (the interceptor chose it by the RPC)."""
        assert build is self._build, "a keyed call's response comes from its own builder"
        return cast(M, self._message(result))

    def _message(self, result: object) -> Message:
        if self._built is None or self._built[0] != result:
            self._built = (result, self._build(result))
        return self._built[1]


@dataclass(frozen=True, slots=True)
class KeyedExecution:
    """The claimed idempotency key of the current call, as the interceptor built it."""

    checkpoint: Checkpoint
    response: Response


current_execution: contextvars.ContextVar[KeyedExecution | None] = contextvars.ContextVar(
    "current_execution", default=None
)


def keyed_execution() -> KeyedExecution:
    """The current keyed call's execution; every keyed RPC runs under the interceptor."""
    execution = current_execution.get()
    if execution is None:
        raise RuntimeError("a keyed RPC ran without the idempotency interceptor")
    return execution


def remember_deadline(context: aio.ServicerContext[Any, Any]) -> None:
    """Make the incoming call's deadline the limit of every call to a collaborator."""
    remaining = context.time_remaining()
    call_deadline.set(None if remaining is None else time.monotonic() + remaining)
