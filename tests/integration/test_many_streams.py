"""Many WatchPaymentStatus streams opened at once.

gRPC core keeps calls that arrived before the server asked for them in a pending queue;
above its soft limit (1000 by default) it cancels arrivals at random, and the caller sees
CANCELLED, which clients do not retry. The server's limits are set deliberately (sized for
the 10,000-watcher goal): every stream below them gets its snapshot, and a stream above
our own limit is answered RESOURCE_EXHAUSTED with RetryInfo, which clients retry.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections import Counter

import grpc
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import Application, build_application
from payment_grpc.config import Settings
from tests.conftest import make_settings
from tests.helpers.builders import charge_request
from tests.helpers.calls import RichError
from tests.helpers.credentials import client_metadata

STREAMS = 2_000
LIMIT = 3
CHANNELS = 4  # a few HTTP/2 connections, as a handful of client replicas would open


@pytest.fixture
def settings(database_url: str, tmp_path: pathlib.Path) -> Settings:
    # A generous pool wait: this test is about gRPC's limits, not the database pool's.
    return make_settings(
        database_url, tmp_path, gateway_success_rate=1.0, db_pool_timeout_seconds=120
    )


async def first_message(stub: payment_service_pb2_grpc.PaymentServiceStub, payment_id: str):  # type: ignore[no-untyped-def]
    """The snapshot, or the error the stream was answered with; the stream stays open."""
    # No deadline: on a loaded machine the last of 2,000 may wait long for its turn, and
    # what is tested is that no stream is dropped, not how fast they are served.
    call = stub.WatchPaymentStatus(api.WatchPaymentStatusRequest(payment_id=payment_id))
    try:
        reply = await call.read()
    except aio.AioRpcError as error:
        return call, RichError(error)
    if reply is aio.EOF:
        return call, RichError.__new__(RichError)
    return call, reply


async def open_streams(app: Application, payment_id: str, count: int) -> list[object]:
    channels = [
        aio.insecure_channel(f"127.0.0.1:{app.port}", interceptors=client_metadata())
        for _ in range(CHANNELS)
    ]
    try:
        stubs = [payment_service_pb2_grpc.PaymentServiceStub(c) for c in channels]
        opened = await asyncio.gather(
            *(first_message(stubs[i % CHANNELS], payment_id) for i in range(count))
        )
        for call, _ in opened:
            call.cancel()
        return [answer for _, answer in opened]
    finally:
        await asyncio.gather(*(c.close() for c in channels))


@pytest.mark.timeout(400)
async def test_two_thousand_watchers_at_once_all_get_their_snapshot(app: Application, stub) -> None:
    # Manual capture: the payment stays AUTHORIZED, so every stream stays open.
    payment = (await stub.Charge(charge_request(1_000, manual=True), timeout=10)).payment
    answers = await open_streams(app, payment.payment_id, STREAMS)
    codes = Counter(a.code.name if isinstance(a, RichError) else "SNAPSHOT" for a in answers)
    assert codes == {"SNAPSHOT": STREAMS}, codes


async def test_a_stream_above_the_limit_is_told_to_retry(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    app = build_application(make_settings(database_url, tmp_path, max_streams=LIMIT))
    await app.start()
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata()
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            held = (await stub.Charge(charge_request(1_000, manual=True), timeout=10)).payment
            opened = [await first_message(stub, held.payment_id) for _ in range(LIMIT)]
            assert all(isinstance(reply, api.WatchPaymentStatusResponse) for _, reply in opened)

            _, refused = await first_message(stub, held.payment_id)
            assert isinstance(refused, RichError)
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.info.reason == "TOO_MANY_STREAMS"
            assert refused.has_retry

            # The capture ends every open stream (settled): their slots are free again.
            capture = api.CapturePaymentRequest(payment_id=held.payment_id)
            await stub.CapturePayment(capture, timeout=10)
            for call, _ in opened:
                assert [m.event.status async for m in call]
                assert await call.code() == grpc.StatusCode.OK
            call, reply = await first_message(stub, held.payment_id)
            assert isinstance(reply, api.WatchPaymentStatusResponse)
            call.cancel()
    finally:
        await app.stop()
