"""Reading the outcome of calls: rich errors, replays, a client's retries."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class RichError:
    """The google.rpc details of a failed call."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self.code = error.code()
        self.message = error.details()
        self.info = error_details_pb2.ErrorInfo()
        self.bad_request = error_details_pb2.BadRequest()
        self.retry = error_details_pb2.RetryInfo()
        status = rpc_status.from_call(error)
        self.has_retry = False
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(self.info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                detail.Unpack(self.bad_request)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                detail.Unpack(self.retry)
                self.has_retry = True

    @property
    def fields(self) -> set[str]:
        return {v.field for v in self.bad_request.field_violations}


async def rpc_error(call: Any) -> RichError:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return RichError(error)
    raise AssertionError("the call succeeded but an error was expected")


async def replayed(call: Any) -> bool:
    """Whether a finished unary call carried `idempotent-replayed: true`."""
    metadata = await call.initial_metadata()
    return ("idempotent-replayed", "true") in list(metadata or ())


async def replayed_error(call: Any) -> bool:
    """Whether a failed unary call's trailers carried `idempotent-replayed: true`."""
    return ("idempotent-replayed", "true") in list(await call.trailing_metadata() or ())


CLIENT_ATTEMPTS = 20


async def call_like_a_client(send: Callable[[], Any]) -> tuple[Any, bool]:
    """(answer, replayed?) of a keyed call, retried like the order service does: after
    ABORTED IDEMPOTENCY_KEY_IN_USE, again once the server's RetryInfo delay has passed."""
    for _ in range(CLIENT_ATTEMPTS):
        call = send()
        try:
            return await call, await replayed(call)
        except grpc.aio.AioRpcError as error:
            rich = RichError(error)
            if rich.info.reason != "IDEMPOTENCY_KEY_IN_USE" or not rich.has_retry:
                raise
            await asyncio.sleep(rich.retry.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError(f"the key was still in use after {CLIENT_ATTEMPTS} attempts")
