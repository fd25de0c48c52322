"""One span, one log line (and, with metrics on, one measurement) per RPC, with the real
status code: rich errors sent with abort_with_status included, which the stock grpc.aio
instrumentation records as OK.

The server span follows the OTel RPC conventions (`rpc.system`, `rpc.service`,
`rpc.method`, `rpc.grpc.status_code`); a W3C `traceparent` from the caller becomes its
parent. The span's trace id is the call's trace id everywhere else: the use cases'
RequestContext (stored on payment events), the log line, the response header.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from payment_grpc.api.context import current_request
from payment_grpc.api.interceptors.wrapping import (
    Handler,
    MethodInterceptor,
    wrap_handler,
)
from payment_grpc.api.methods import split_method
from payment_grpc.telemetry import tracing
from payment_grpc.telemetry.metrics import RPC_DURATION, WATCHERS

log = logging.getLogger("payment_grpc.rpc")
TRACE_ID_HEADER = "x-trace-id"
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
HEALTH_SERVICE = "grpc.health.v1.Health"
# Server spans are errors only for these codes (OTel gRPC conventions); the others are
# the caller's problem and leave the span status unset.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class InFlight:
    """Calls started and not finished (the shutdown grace counts them)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def finished(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no call is in flight (each one's own clean-up included)."""
        await self._idle.wait()


@dataclass
class CallRecord:
    """What inner layers learn about the call and the log line reports."""

    trace_id: str
    span_id: str
    request_id: str = ""
    payment_id: str = ""  # the payment the call touched, for "everything about payment X"
    replayed: bool = False


_current_call: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "observed_call", default=None
)


def mark_replayed() -> None:
    """The idempotency layer answered from a stored response (`idempotent-replayed`)."""
    call = _current_call.get()
    if call is not None:
        call.replayed = True


def payment_of(message: Any, answer_type: type[Message] | None = None) -> str:
    """The payment a request names (`payment_id`) or an answer carries (`payment`); an
    answer already serialized (the idempotency layer sends stored bytes) is read back
    with `answer_type`."""
    if isinstance(message, bytes) and answer_type is not None:
        try:
            message = answer_type.FromString(message)
        except DecodeError:
            return ""
    named = getattr(message, "payment_id", "")
    if isinstance(named, str) and named:
        return named
    payment = getattr(message, "payment", None)
    named = getattr(payment, "payment_id", "")
    return named if isinstance(named, str) else ""


@functools.cache
def answer_type(full_method: str) -> type[Message] | None:
    """The response message class of a method whose answer names a payment."""
    try:
        method = descriptor_pool.Default().FindMethodByName(
            full_method.lstrip("/").replace("/", ".")
        )
    except KeyError:
        return None
    if "payment" not in method.output_type.fields_by_name:
        return None
    return message_factory.GetMessageClass(method.output_type)


def request_id(metadata: dict[str, str]) -> str:
    """The caller's `x-request-id` when it is printable ASCII of sane length, else ""."""
    value = metadata.get(REQUEST_ID_HEADER, "")
    if len(value) > MAX_REQUEST_ID or not all(" " < ch <= "~" for ch in value):
        return ""
    return value


class HeaderedContext:
    """The servicer context, adding our response headers (`x-trace-id`, the echoed
    `x-request-id`) to the initial metadata however and whenever it is sent: with the
    first message, by the handler (idempotent-replayed), or before an error."""

    def __init__(
        self, context: aio.ServicerContext[Any, Any], headers: tuple[tuple[str, str], ...]
    ):
        self._context = context
        self._headers = headers
        self._sent = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def send_initial_metadata(self, metadata: Any) -> None:
        self._sent = True
        await self._context.send_initial_metadata((*self._headers, *metadata))

    async def send_headers(self) -> None:
        if not self._sent:
            await self.send_initial_metadata(())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        await self.send_headers()
        await self._context.abort(code, details, trailing_metadata)

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.send_headers()
        aborting: Any = self._context  # grpc-stubs lacks aio's abort_with_status
        await aborting.abort_with_status(status)

    async def write(self, message: Any) -> None:
        await self.send_headers()
        await self._context.write(message)


def text_metadata(metadata: tuple[Any, ...] | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def status_code(
    context: aio.ServicerContext[Any, Any], error: BaseException | None
) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int) and code != 0:
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the caller went away
        return grpc.StatusCode.CANCELLED
    if error is not None and not isinstance(error, aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


def _start_span(full_method: str, metadata: dict[str, str]) -> tuple[trace.Span, Any]:
    service, method = split_method(full_method)
    parent = tracing.extract(metadata)
    span = tracing.tracer().start_span(
        f"{service}/{method}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
    )
    if not span.get_span_context().is_valid:
        # No SDK installed: keep the caller's trace (or start one) in a span of our own
        # that is not recorded, so logs, events and outgoing calls still carry it.
        caller = trace.get_current_span(parent).get_span_context()
        span = NonRecordingSpan(
            SpanContext(
                trace_id=caller.trace_id if caller.is_valid else int(tracing.new_trace_id(), 16),
                span_id=secrets.randbits(64),
                is_remote=False,
                trace_flags=caller.trace_flags,
                trace_state=caller.trace_state,
            )
        )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    return span, token


class ObservabilityInterceptor(MethodInterceptor):
    """Every call, health and reflection included (health's log line is DEBUG)."""

    def __init__(self, calls: InFlight | None = None) -> None:
        self._calls = calls or InFlight()

    def applies(self, details: grpc.HandlerCallDetails) -> bool:
        return True

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        return wrap_handler(
            handler,
            lambda behavior: _Observed(self._calls, details, behavior).unary,
            lambda behavior: _Observed(self._calls, details, behavior).streaming,
        )


class _Observed:
    """One call observed. A bound method of this is the call's handler: a few objects for
    as long as the call lasts (a stream: as long as it is open), where closures over the
    call's details kept ~16 (4 functions, their cell tuples, 9 cells)."""

    __slots__ = ("_behavior", "_calls", "_full_method", "_level", "_metadata", "_rpc_attributes")

    def __init__(self, calls: InFlight, details: grpc.HandlerCallDetails, behavior: Any) -> None:
        self._calls = calls
        self._behavior = behavior
        self._full_method = full_method = details.method
        self._metadata = text_metadata(details.invocation_metadata)
        quiet = full_method.startswith(f"/{HEALTH_SERVICE}/")
        self._level = logging.DEBUG if quiet else logging.INFO
        service, method = split_method(full_method)
        self._rpc_attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

    def _start(self) -> tuple[trace.Span, Any, CallRecord, float]:
        span, token = _start_span(self._full_method, self._metadata)
        call = CallRecord(
            tracing.trace_id_of(span), tracing.span_id_of(span), request_id(self._metadata)
        )
        _current_call.set(call)
        log.debug("rpc started", extra={"rpc_method": self._full_method, "trace_id": call.trace_id})
        self._calls.started()
        return span, token, call, time.perf_counter()

    @staticmethod
    def _headered(context: aio.ServicerContext[Any, Any], call: CallRecord) -> HeaderedContext:
        headers: tuple[tuple[str, str], ...] = ((TRACE_ID_HEADER, call.trace_id),)
        if call.request_id:
            headers += ((REQUEST_ID_HEADER, call.request_id),)
        return HeaderedContext(context, headers)

    def _finish(
        self,
        started: tuple[trace.Span, Any, CallRecord, float],
        context: aio.ServicerContext[Any, Any],
        error: BaseException | None,
    ) -> None:
        span, token, call, began = started
        self._calls.finished()
        elapsed = time.perf_counter() - began
        code = status_code(context, error)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        RPC_DURATION.record(
            elapsed * 1000, {**self._rpc_attributes, "rpc.grpc.status_code": code.value[0]}
        )
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
        otel_context.detach(token)
        level = self._level
        if not log.isEnabledFor(level):
            return  # the line's fields are not even gathered
        log.log(
            level,
            "rpc finished",
            extra={
                "rpc_method": self._full_method,
                "grpc_code": code.name,
                "duration_ms": round(elapsed * 1000, 2),
                "trace_id": call.trace_id,
                "span_id": call.span_id,
                "request_id": call.request_id,
                "payment_id": call.payment_id,
                "subject": current_request.get().subject,
                "idempotent_replayed": call.replayed,
            },
        )

    async def unary(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        started = self._start()
        error: BaseException | None = None
        started[2].payment_id = payment_of(request)
        try:
            annotated = self._headered(context, started[2])
            response = await self._behavior(request, cast(Any, annotated))
            await annotated.send_headers()
            if not started[2].payment_id and log.isEnabledFor(self._level):
                # Only the log line names it: a stored answer is not decoded
                # again for a line that is not written.
                started[2].payment_id = payment_of(response, answer_type(self._full_method))
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish(started, context, error)

    async def streaming(
        self, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        started = self._start()
        WATCHERS.add(1, self._rpc_attributes)
        error: BaseException | None = None
        started[2].payment_id = payment_of(request)
        try:
            annotated = self._headered(context, started[2])
            async for item in self._behavior(request, cast(Any, annotated)):
                await annotated.send_headers()
                yield item
            await annotated.send_headers()  # a stream that ended empty
        except BaseException as exc:
            error = exc
            raise
        finally:
            WATCHERS.add(-1, self._rpc_attributes)
            self._finish(started, context, error)
