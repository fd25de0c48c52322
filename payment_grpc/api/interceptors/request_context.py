"""The first thing every call gets: a fresh RequestContext for the use cases (anonymous
until auth names the caller; the trace id of the server span observability started) and
the incoming deadline, which every call to a collaborator respects."""

from __future__ import annotations

from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace

from payment_grpc.api.context import current_request, remember_deadline
from payment_grpc.api.interceptors.wrapping import CheckFirst
from payment_grpc.service.context import RequestContext
from payment_grpc.telemetry import tracing


class RequestContextInterceptor(CheckFirst):
    def applies(self, details: grpc.HandlerCallDetails) -> bool:
        return True

    async def check(
        self, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> None:
        current_request.set(RequestContext(trace_id=tracing.trace_id_of(trace.get_current_span())))
        remember_deadline(context)
