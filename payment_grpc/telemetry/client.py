"""Client side of tracing for our outgoing gRPC calls (auth service, order service):
a CLIENT span per call with the OTel RPC attributes and the real status code, and the
W3C trace context in the call's metadata, so the callee's spans join our trace."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from payment_grpc.telemetry import tracing

if TYPE_CHECKING:
    UnaryUnaryClientInterceptor = aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    UnaryUnaryClientInterceptor = aio.UnaryUnaryClientInterceptor

# Every failure of a call we make is an error of our span (OTel gRPC client convention).
_OK = grpc.StatusCode.OK


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def with_trace_headers(details: aio.ClientCallDetails) -> aio.ClientCallDetails:
    """`details` with the current span's traceparent/tracestate replacing any present."""
    headers = tracing.trace_headers()
    if not headers:
        return details
    kept = [(k, v) for k, v in details.metadata or () if k not in headers]
    metadata = aio.Metadata(*kept, *headers.items())
    return aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class TracingClientInterceptor(UnaryUnaryClientInterceptor):
    """Pass in `interceptors=tracing_interceptors()` when opening a channel."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        service, method = _method_name(client_call_details.method).lstrip("/").rsplit("/", 1)
        span = tracing.tracer().start_span(
            f"{service}/{method}",
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        if not span.get_span_context().is_valid:  # no SDK: pass the caller's context on
            return await continuation(with_trace_headers(client_call_details), request)
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            call = await continuation(with_trace_headers(client_call_details), request)
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != _OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            return call


def tracing_interceptors() -> list[Any]:
    """The interceptors to open a traced channel with (grpc-stubs types the parameter
    as a placeholder, hence Any)."""
    return [TracingClientInterceptor()]
