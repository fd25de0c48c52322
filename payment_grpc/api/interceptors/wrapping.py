"""Wrap the behaviour of a grpc.aio method handler: the aio interceptor API only sees
call details, so interceptors that need the request or the outcome wrap the handler."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc import aio

if TYPE_CHECKING:
    ServerInterceptor = aio.ServerInterceptor[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]
else:  # not subscriptable at run time
    ServerInterceptor = aio.ServerInterceptor
    Handler = grpc.RpcMethodHandler
    Continuation = Callable

Unary = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]
Streaming = Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
    *,
    passthrough_bytes: bool = False,
    deserializer: Callable[[Callable[[bytes], Any]], Callable[[bytes], Any]] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """Return `handler` with its unary-unary or unary-stream behaviour wrapped.

    With `passthrough_bytes`, a behaviour may return already serialized bytes (a stored
    response replayed exactly); they are sent as they are. `deserializer` wraps the
    request deserializer.
    """
    if handler.request_streaming:
        return handler  # no client-streaming RPCs in this API
    request_deserializer = handler.request_deserializer
    if deserializer is not None and request_deserializer is not None:
        request_deserializer = deserializer(request_deserializer)
    if handler.response_streaming:
        behavior: Any = handler.unary_stream  # grpc-stubs types aio handlers as sync
        # A streaming handler is either an async generator or a coroutine that writes
        # with context.write() (grpc_health's Watch); the latter wraps like a unary one.
        wrapped = streaming(behavior) if inspect.isasyncgenfunction(behavior) else unary(behavior)
        return grpc.unary_stream_rpc_method_handler(
            wrapped,
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer,
        )
    serializer = handler.response_serializer
    if passthrough_bytes and serializer is not None:
        serializer = _passthrough(serializer)
    return grpc.unary_unary_rpc_method_handler(
        unary(cast(Unary, handler.unary_unary)),
        request_deserializer=request_deserializer,
        response_serializer=serializer,
    )


def _passthrough(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def serialized(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialized


def is_payment_service(method: str) -> bool:
    return method.startswith("/payments.v1.PaymentService/")
