"""Wrap the behaviour of a grpc.aio method handler: the aio interceptor API only sees
call details, so interceptors that need the request or the outcome wrap the handler.

`MethodInterceptor` is the shape of all of ours (which methods, then how to wrap their
handler); `CheckFirst` is the common kind that only checks something before the call
(and refuses it with a status, or lets it through). `chained` hands grpc.aio one
interceptor for a run of them: one handler lookup per call instead of one per layer.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from grpc import aio

from payment_grpc.api.errors import abort_with, status_for
from payment_grpc.api.methods import is_ours
from payment_grpc.domain.errors import ReportableError

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
B = TypeVar("B", Unary, Streaming)


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
    *,
    passthrough_bytes: bool = False,
    deserializer: Callable[[Callable[[bytes], Any]], Callable[[bytes], Any]] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """Return `handler` with its unary-unary or unary-stream behaviour wrapped.

    With `passthrough_bytes`, a behaviour may return (or a streaming one yield) already
    serialized bytes (a stored response replayed exactly, an event encoded once for all
    its watchers); they are sent as they are. `deserializer` wraps the request
    deserializer.
    """
    if handler.request_streaming:
        return handler  # no client-streaming RPCs in this API
    if handler.response_streaming:
        behavior: Any = handler.unary_stream  # grpc-stubs types aio handlers as sync
        # A streaming handler is either an async generator or a coroutine that writes
        # with context.write() (grpc_health's Watch); the latter wraps like a unary one.
        wrap: Callable[[Any], Any] = streaming if inspect.isasyncgenfunction(behavior) else unary
    else:
        behavior = handler.unary_unary
        wrap = unary
    serializer = handler.response_serializer
    passthrough_bytes = passthrough_bytes and serializer is not None
    if wrap is unchanged and deserializer is None and not passthrough_bytes:
        return handler  # this kind of call is left alone: no new handler for it
    request_deserializer = handler.request_deserializer
    if deserializer is not None and request_deserializer is not None:
        request_deserializer = deserializer(request_deserializer)
    if passthrough_bytes and serializer is not None:
        serializer = _passthrough(serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            wrap(behavior),
            request_deserializer=request_deserializer,
            response_serializer=serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        wrap(cast(Unary, behavior)),
        request_deserializer=request_deserializer,
        response_serializer=serializer,
    )


@functools.cache  # one per method's serializer, not one per call
def _passthrough(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def serialized(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialized


def unchanged(behavior: B) -> B:
    """The behaviour as it is (for the kind of call an interceptor leaves alone)."""
    return behavior


class MethodInterceptor(ServerInterceptor):
    """Wraps the handler of every method it `applies` to (by default our own services'
    methods, not health or reflection) with `wrap`."""

    def applies(self, details: grpc.HandlerCallDetails) -> bool:
        return is_ours(details.method)

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or not self.applies(handler_call_details):
            return handler
        return self.wrap(handler, handler_call_details)


class SendsEncoded(MethodInterceptor):
    """The handlers of `methods` may answer with already serialized messages (bytes),
    sent as they are; a message object is still serialized by the method's serializer."""

    def __init__(self, methods: Iterable[str]) -> None:
        self._methods = frozenset(methods)

    def applies(self, details: grpc.HandlerCallDetails) -> bool:
        return details.method in self._methods

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        return wrap_handler(handler, unchanged, unchanged, passthrough_bytes=True)


class _Chain(ServerInterceptor):
    """Several MethodInterceptors as one grpc.aio interceptor: the handler is looked up
    once, then wrapped by each of them, innermost first, exactly as grpc.aio would have
    had them wrap it one continuation at a time."""

    def __init__(self, interceptors: Sequence[MethodInterceptor]) -> None:
        self._innermost_first = tuple(reversed(interceptors))

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        for interceptor in self._innermost_first:
            if handler is None:
                return handler
            if interceptor.applies(handler_call_details):
                handler = interceptor.wrap(handler, handler_call_details)
        return handler


def chained(interceptors: Sequence[ServerInterceptor]) -> list[ServerInterceptor]:
    """`interceptors` (call order: the first sees the call first) with each run of
    MethodInterceptors made one: per call, grpc.aio runs one intercept_service coroutine
    for the run instead of one per interceptor. The calls see no difference."""
    composed: list[ServerInterceptor] = []
    run: list[MethodInterceptor] = []
    for interceptor in interceptors:
        if isinstance(interceptor, MethodInterceptor) and (
            type(interceptor).intercept_service is MethodInterceptor.intercept_service
        ):
            run.append(interceptor)
            continue
        if run:
            composed.append(_Chain(run))
            run = []
        composed.append(interceptor)
    if run:
        composed.append(_Chain(run))
    return composed


class CheckFirst(MethodInterceptor):
    """Runs `check` before the handler, for unary and streaming calls alike. It returns
    the status that refuses the call, or None to let it through; a ReportableError it
    raises refuses the call through the error table."""

    async def check(
        self, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> grpc.Status | None:
        raise NotImplementedError

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        return wrap_handler(
            handler,
            lambda behavior: _Checked(self, details, behavior).unary,
            lambda behavior: _Checked(self, details, behavior).streaming,
        )


class _Checked:
    """One call through a CheckFirst: its check, then the behaviour. A bound method of
    this is the call's handler: 2 objects for as long as the call lasts (a stream: as
    long as it is open), where closures over the interceptor, the details and the
    behaviour kept 8 (2 functions, their cell tuples and 4 cells)."""

    __slots__ = ("_behavior", "_details", "_interceptor")

    def __init__(self, interceptor: CheckFirst, details: grpc.HandlerCallDetails, behavior: Any):
        self._interceptor = interceptor
        self._details = details
        self._behavior = behavior

    async def _check(self, context: aio.ServicerContext[Any, Any]) -> None:
        try:
            refusal = await self._interceptor.check(self._details, context)
        except ReportableError as error:
            refusal = status_for(error)
        if refusal is not None:
            await abort_with(context, refusal)

    async def unary(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await self._check(context)
        return await self._behavior(request, context)

    async def streaming(
        self, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await self._check(context)
        async for item in self._behavior(request, context):
            yield item
