"""Running an Application for a test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from grpc import aio
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import Application, build_application
from payment_grpc.config import Settings
from payment_grpc.service.ports import Clock
from tests.helpers.credentials import client_metadata


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, clock: Clock | None = None
) -> AsyncIterator[tuple[Application, payment_service_pb2_grpc.PaymentServiceStub]]:
    """A started application, its recovery worker's start-up pass done, and a stub that
    adds the admin token (no idempotency keys). `clock`: the application's, if given."""
    app = build_application(settings, clock)
    await app.start()
    try:
        await app.recovery.wait_for_passes(1)
        async with aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata(keys=False)
        ) as channel:
            yield app, payment_service_pb2_grpc.PaymentServiceStub(channel)
    finally:
        await app.stop()
