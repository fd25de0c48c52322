"""Builds the use cases' RequestContext from the call (caller identity, trace id)."""

from __future__ import annotations

import contextvars
from typing import Any

from grpc import aio

from payment_grpc.service.context import RequestContext

# Set by interceptors (auth, tracing) for the current call; anonymous by default.
current_request: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "current_request",
    default=RequestContext(),  # noqa: B039 - frozen dataclass, immutable
)


def request_context(context: aio.ServicerContext[Any, Any]) -> RequestContext:
    return current_request.get()
