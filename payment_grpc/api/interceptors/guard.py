"""Validates every request before a use case runs, and turns every failure into a
clear gRPC status: reportable errors through the error table, anything unexpected into a
bare INTERNAL (logged here, never sent to the caller)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from payment_grpc.api.errors import (
    INTERNAL,
    abort_with,
    build_status,
    code_for,
    invalid_argument,
    status_for,
)
from payment_grpc.api.interceptors.wrapping import (
    Handler,
    MethodInterceptor,
    Streaming,
    Unary,
    wrap_handler,
)
from payment_grpc.api.validation import violations
from payment_grpc.domain.errors import ReportableError

log = logging.getLogger(__name__)


# Stands in for request bytes that do not parse, so the guard can answer them.
_UNDECODABLE = object()

UNDECODABLE_REQUEST = build_status(
    grpc.StatusCode.INVALID_ARGUMENT,
    "the request message could not be decoded",
    "MALFORMED_REQUEST",
)


@functools.cache  # one per method's deserializer, not one per call
def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # A raising deserializer makes grpc.aio answer UNKNOWN; the caller deserves
    # INVALID_ARGUMENT with details instead.
    def deserialized(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialized


async def _reject_invalid(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
    if request is _UNDECODABLE:
        await abort_with(context, UNDECODABLE_REQUEST)
    found = violations(request)
    if found:
        await abort_with(context, invalid_argument(found))


async def _abort_for(exc: BaseException, context: aio.ServicerContext[Any, Any]) -> NoReturn:
    if isinstance(exc, ReportableError):
        if code_for(exc) is grpc.StatusCode.INTERNAL:  # our fault: the caller hears no more
            log.error("%s in handler: %s", type(exc).__name__, exc, exc_info=exc)
        await abort_with(context, status_for(exc))
    log.error("unexpected error in handler", exc_info=exc)
    await abort_with(context, INTERNAL)


def _guard_unary(behavior: Unary) -> Unary:
    async def guarded(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await _reject_invalid(request, context)
        try:
            return await behavior(request, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort_for(exc, context)

    return guarded


def _guard_streaming(behavior: Streaming) -> Streaming:
    async def guarded(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await _reject_invalid(request, context)
        try:
            async for item in behavior(request, context):
                yield item
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort_for(exc, context)

    return guarded


class GuardInterceptor(MethodInterceptor):
    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        return wrap_handler(handler, _guard_unary, _guard_streaming, deserializer=_tolerant)
