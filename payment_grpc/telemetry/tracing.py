"""Traces: the OTLP exporter when configured, W3C trace context in and out.

Spans are exported only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; every other standard variable
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`, `OTEL_PROPAGATORS`, `OTEL_SDK_DISABLED`) is read by
the SDK itself. Without an endpoint no SDK is installed: the caller's trace context still
passes through (logs, payment events and outgoing calls keep its trace id).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncEngine

TRACER_NAME = "payment_grpc"
DEFAULT_SERVICE_NAME = "payment-grpc"
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def export_configured(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


def resource(instance_id: str) -> Resource:
    """service.name defaults to payment-grpc; OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES (read by Resource.create) override it."""
    detected = Resource.create({SERVICE_INSTANCE_ID: instance_id})
    if os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        return detected
    return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))


def install_tracing(instance_id: str) -> TracerProvider | None:
    """The process-wide tracer provider with the OTLP (gRPC) exporter, or None when no
    endpoint is configured. Call once per process (`serve`)."""
    if not export_configured():
        return None
    # Imported here: the exporter pulls in its gRPC stubs only when it is used.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=resource(instance_id))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def trace_database(engine: AsyncEngine, provider: TracerProvider) -> None:
    """A client span per SQL statement (db.system, db.statement without parameters)."""
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    # Its declared range stops below SQLAlchemy 2.1, whose engine events it uses are
    # unchanged; tests/e2e/test_tracing.py checks the spans on both databases.
    SQLAlchemyInstrumentor().instrument(
        engine=engine.sync_engine,
        tracer_provider=provider,
        enable_commenter=False,
        skip_dep_check=True,
    )


@functools.cache
def tracer() -> trace.Tracer:
    """Ours, got once: before an SDK is installed this is the API's proxy, which follows
    the provider installed later (there is only ever one per process)."""
    return trace.get_tracer(TRACER_NAME)


def extract(metadata: Mapping[str, str]) -> Context:
    """The caller's context from W3C `traceparent`/`tracestate` (malformed: ignored)."""
    return propagate.extract(metadata)


def trace_headers() -> dict[str, str]:
    """W3C headers of the current span (`traceparent`, `tracestate` when set): for
    outgoing calls, outbox messages and broker headers. Empty outside any trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None outside any trace."""
    return trace_headers().get("traceparent")


def trace_id_in(traceparent: str) -> str:
    """The trace id a W3C traceparent names ("" when it is not one)."""
    context = trace.get_current_span(extract({"traceparent": traceparent})).get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def traceparent_of_trace(trace_id: str) -> str:
    """The current traceparent when it belongs to `trace_id`, else "": what a change made
    under that trace records beside its trace id (payment events, outbox messages)."""
    context = trace.get_current_span().get_span_context()
    if not trace_id or not context.is_valid or trace.format_trace_id(context.trace_id) != trace_id:
        return ""
    # W3C format whatever OTEL_PROPAGATORS says: the envelope's field is a W3C traceparent.
    return f"00-{trace_id}-{trace.format_span_id(context.span_id)}-{context.trace_flags:02x}"


@contextlib.contextmanager
def continued(traceparent: str) -> Iterator[None]:
    """Run the block under the trace a stored `traceparent` names (the call that made a
    change), so spans and outgoing calls made in it join that trace; an empty or malformed
    one leaves the block outside any trace. For work done later, away from that call:
    the outbox relay's deliveries, a broker message's handling."""
    parent = extract({"traceparent": traceparent}) if traceparent else Context()
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def messaging_span(destination: str, operation: str) -> Iterator[dict[str, str]]:
    """A span for a broker message (OTel messaging conventions), when the SDK is installed:
    PRODUCER `<destination> publish` in the current trace (none outside a trace), or
    CONSUMER `<destination> process` (a new trace when the message carried none). Yields
    the W3C headers of the current trace for the message (none outside a trace)."""
    publishing = operation == "publish"
    if publishing and not trace.get_current_span().get_span_context().is_valid:
        yield {}
        return
    span = tracer().start_span(
        f"{destination} {operation}",
        kind=SpanKind.PRODUCER if publishing else SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": destination,
            "messaging.operation": operation,
        },
    )
    if not span.get_span_context().is_valid:  # no SDK and no trace
        yield {}
        return
    with trace.use_span(span, end_on_exit=True):
        yield trace_headers()


def trace_id_of(span: trace.Span) -> str:
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def span_id_of(span: trace.Span) -> str:
    context = span.get_span_context()
    return trace.format_span_id(context.span_id) if context.is_valid else ""


def new_trace_id() -> str:
    """A W3C trace id for a call that arrived without one while no SDK is installed."""
    return secrets.token_hex(16)
