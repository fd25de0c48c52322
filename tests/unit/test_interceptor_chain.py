"""`chained`: a run of MethodInterceptors handed to grpc.aio as one interceptor wraps the
handler exactly as the separate interceptors did (same order around the handler, other
interceptors kept in their place), on a real server on port 0."""

from __future__ import annotations

from typing import Any

import grpc
from grpc import aio

from payment_grpc.api.interceptors.wrapping import (
    Continuation,
    Handler,
    MethodInterceptor,
    ServerInterceptor,
    Unary,
    chained,
    unchanged,
    wrap_handler,
)

METHOD = "/test.Chain/Echo"


class Recording(MethodInterceptor):
    def __init__(self, name: str, seen: list[str]) -> None:
        self._name = name
        self._seen = seen

    def applies(self, details: grpc.HandlerCallDetails) -> bool:
        return True

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        def unary(behavior: Unary) -> Unary:
            async def recorded(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                self._seen.append(f"{self._name} in")
                response = await behavior(request, context)
                self._seen.append(f"{self._name} out")
                return response

            return recorded

        return wrap_handler(handler, unary, unchanged)


class Plain(ServerInterceptor):
    """An interceptor of grpc.aio's own shape: stays a link of its own."""

    def __init__(self, seen: list[str]) -> None:
        self._seen = seen

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        self._seen.append("plain looked up")
        return await continuation(handler_call_details)


async def _echo(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def _call(interceptors: list[ServerInterceptor]) -> bytes:
    server = aio.server(interceptors=interceptors)
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Chain", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer: bytes = await channel.unary_unary(METHOD)(b"ping")
            return answer
    finally:
        await server.stop(None)


async def test_a_chain_wraps_the_handler_as_the_interceptors_did_one_by_one() -> None:
    separate: list[str] = []
    joined: list[str] = []

    def interceptors(seen: list[str]) -> list[ServerInterceptor]:
        return [Recording("a", seen), Plain(seen), Recording("b", seen), Recording("c", seen)]

    assert await _call(interceptors(separate)) == b"ping"
    composed = chained(interceptors(joined))
    assert [type(i).__name__ for i in composed] == ["_Chain", "Plain", "_Chain"]
    assert await _call(composed) == b"ping"
    assert joined == separate
    assert separate == ["plain looked up", "a in", "b in", "c in", "c out", "b out", "a out"]


def test_a_behaviour_left_unchanged_keeps_its_handler() -> None:
    handler = grpc.unary_unary_rpc_method_handler(_echo, response_serializer=bytes)
    assert wrap_handler(handler, unchanged, unchanged) is handler
    # Stored answers sent as they are need the serializer that lets bytes through.
    assert wrap_handler(handler, unchanged, unchanged, passthrough_bytes=True) is not handler
