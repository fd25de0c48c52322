"""Open watch streams that wait: heartbeats while quiet, the end at shutdown, and what
each one keeps alive (issue 12: 10,000 open on one process, and the garbage collector
walks every object they keep). Real servers on port 0, both databases."""

from __future__ import annotations

import asyncio
import gc
import pathlib
import time

import grpc
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import Application
from payment_grpc.config import Settings
from tests.conftest import make_settings
from tests.helpers.builders import S, charge_request
from tests.helpers.calls import RichError
from tests.helpers.credentials import client_metadata

HEARTBEAT_S = 0.2
WATCHERS = 200
# Tracked objects one open quiet watch adds, server AND client side in this process
# (gRPC's own call state included). Measured 2026-12-01: 152 (184 while observability,
# CheckFirst, the stream limit and the drain kept closures per call, and guard a request
# deserializer per call); 269-273 while each watch kept its snapshot's transaction and
# payment, two tasks racing its next message (heartbeat, shutdown), an asyncio.Event and
# generator-based context managers.
MAX_OBJECTS_PER_WATCH = 180


@pytest.fixture
def settings(database_url: str, tmp_path: pathlib.Path) -> Settings:
    return make_settings(database_url, tmp_path, watch_heartbeat_seconds=HEARTBEAT_S)


def _watch(stub, payment_id: str):  # type: ignore[no-untyped-def]
    return stub.WatchPaymentStatus(api.WatchPaymentStatusRequest(payment_id=payment_id))


async def test_a_quiet_watch_gets_heartbeats_then_its_event(stub) -> None:
    payment = (await stub.Charge(charge_request(manual=True))).payment
    call = _watch(stub, payment.payment_id)
    assert (await call.read()).event.status == S.PAYMENT_STATUS_AUTHORIZED
    for _ in range(2):
        heartbeat = await asyncio.wait_for(call.read(), 10 * HEARTBEAT_S + 5)
        assert not heartbeat.HasField("event")
        sent = heartbeat.heartbeat_time.ToNanoseconds()
        assert abs(time.time_ns() - sent) < 5 * 10**9  # the server's now (same clock here)
        assert heartbeat.heartbeat_time.nanos % 1000 == 0  # microseconds, as RFC 3339 JSON showed
    await stub.CapturePayment(api.CapturePaymentRequest(payment_id=payment.payment_id))
    while (message := await call.read()) is not grpc.aio.EOF and not message.HasField("event"):
        pass  # a heartbeat may come first
    assert message.event.status == S.PAYMENT_STATUS_CAPTURED
    assert await call.read() is grpc.aio.EOF


async def _ended(call) -> RichError:  # type: ignore[no-untyped-def]
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except aio.AioRpcError as error:
        return RichError(error)
    raise AssertionError("stream ended OK, not UNAVAILABLE")


async def test_waiting_streams_end_unavailable_at_shutdown_and_let_go_of_the_bus(
    app: Application, stub
) -> None:
    payment = (await stub.Charge(charge_request(manual=True))).payment
    watches = [_watch(stub, payment.payment_id) for _ in range(20)]
    for watch in watches:
        await watch.read()  # the snapshot: each is now waiting for a change
    feed = stub.WatchPayments(api.WatchPaymentsRequest())
    for _ in range(payment.sequence):
        await feed.read()  # the feed's backlog: it waits for a change too
    assert app.bus.watcher_count() == len(watches) + 1

    stopping = asyncio.create_task(app.stop())
    ended = await asyncio.gather(*(_ended(call) for call in [*watches, feed]))
    await stopping
    assert {(e.code, e.info.reason) for e in ended} == {
        (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
    }
    assert app.bus.watcher_count() == 0  # every stream's clean-up ran


async def test_an_open_quiet_watch_keeps_few_objects_alive(app: Application, stub) -> None:
    payment = (await stub.Charge(charge_request(manual=True))).payment
    channel = aio.insecure_channel(f"127.0.0.1:{app.port}", interceptors=client_metadata())
    watcher = payment_service_pb2_grpc.PaymentServiceStub(channel)
    try:
        warm = _watch(watcher, payment.payment_id)
        await warm.read()  # first-call caches (channel, handler lookup) left out
        gc.collect()
        before = len(gc.get_objects())
        watches = [_watch(watcher, payment.payment_id) for _ in range(WATCHERS)]
        for watch in watches:
            await watch.read()
        gc.collect()
        per_watch = (len(gc.get_objects()) - before) / WATCHERS
        assert per_watch <= MAX_OBJECTS_PER_WATCH, per_watch
    finally:
        await channel.close(None)
