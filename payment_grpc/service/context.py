"""Who is calling and under which trace: passed from the api layer into every use case."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class RequestContext:
    subject: str = ANONYMOUS
    customer_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    trace_id: str = ""


SYSTEM = RequestContext(subject="system:recovery")
GATEWAY_CALLBACK = RequestContext(subject="system:gateway-callback")

# When the incoming call must be answered (time.monotonic() seconds), set by the api layer
# for the current call; calls to collaborators never wait past it. None: no deadline.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_deadline", default=None
)
