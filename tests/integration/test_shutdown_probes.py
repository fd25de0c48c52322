"""Stopping a replica: readiness goes NOT_SERVING first while liveness stays SERVING and
calls are still accepted during the drain delay; open watch streams then end at once with
UNAVAILABLE SERVER_SHUTTING_DOWN (clients resume with from_sequence elsewhere); a
readiness check added by another part of the service (the hook) gates readiness."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import build_application
from tests.conftest import make_settings
from tests.helpers.builders import S, charge_request
from tests.helpers.calls import RichError
from tests.helpers.credentials import client_metadata

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = "payments.v1.PaymentService"


async def _status(channel: aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def _until(channel: aio.Channel, service: str, wanted: int) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
        if reply.status == wanted:
            return


async def test_sigterm_order_readiness_drain_then_streams_end_unavailable(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    # The drain is long enough for the checks below; the test never waits it out idly:
    # it awaits each observable step.
    app = build_application(make_settings(database_url, tmp_path, shutdown_drain_seconds=3))
    await app.start()
    stopping: asyncio.Task[None] | None = None
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata()
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            held = (await stub.Charge(charge_request(manual=True))).payment
            assert held.status == S.PAYMENT_STATUS_AUTHORIZED  # its watch stays open
            watch = stub.WatchPaymentStatus(
                api.WatchPaymentStatusRequest(payment_id=held.payment_id)
            )
            snapshot = await watch.read()
            assert snapshot.event.sequence == held.sequence

            stopping = asyncio.create_task(app.stop())
            await _until(channel, READINESS, NOT_SERVING)
            # Draining: liveness still SERVING, and new calls are still served.
            assert await _status(channel, "") == SERVING
            late = (await stub.Charge(charge_request())).payment
            assert late.status == S.PAYMENT_STATUS_CAPTURED

            # Then the open stream ends with UNAVAILABLE, well before the grace period.
            try:
                while True:
                    message = await watch.read()
                    assert message is not grpc.aio.EOF, "stream ended OK, not UNAVAILABLE"
            except aio.AioRpcError as error:
                ended = RichError(error)
            assert ended.code == grpc.StatusCode.UNAVAILABLE
            assert ended.info.reason == "SERVER_SHUTTING_DOWN"
            assert ended.has_retry
        await stopping
    finally:
        if stopping is None:
            await app.stop()


async def test_a_failing_readiness_check_keeps_the_service_unready_but_alive(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    app = build_application(make_settings(database_url, tmp_path))
    breaker_closed = asyncio.Event()

    async def gateway_breaker_closed() -> bool:
        return breaker_closed.is_set()

    app.server.add_readiness_check(gateway_breaker_closed)
    await app.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            assert await _status(channel, READINESS) == NOT_SERVING
            assert await _status(channel, "") == SERVING
            breaker_closed.set()
            await _until(channel, READINESS, SERVING)
    finally:
        await app.stop()
