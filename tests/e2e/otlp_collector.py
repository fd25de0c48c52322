"""A real OTLP/gRPC trace collector on 127.0.0.1 port 0: what the service exports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class ExportedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any]


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self._arrived = asyncio.Condition()

    async def Export(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans += [
                    ExportedSpan(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        kind=s.kind,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        status_code=s.status.code,
                        resource=resource,
                    )
                    for s in scope_spans.spans
                ]
        async with self._arrived:
            self._arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, found: Callable[[list[ExportedSpan]], bool]) -> list[ExportedSpan]:
        """Waits until `found(spans)` holds for the spans exported so far."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: found(self.spans))
        return self.spans


@contextlib.asynccontextmanager
async def otlp_collector() -> AsyncIterator[tuple[Collector, str]]:
    """The collector and its endpoint URL for OTEL_EXPORTER_OTLP_ENDPOINT."""
    collector = Collector()
    server = aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield collector, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(None)
