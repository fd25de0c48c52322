"""Per-caller token bucket: RESOURCE_EXHAUSTED with RetryInfo; others and health unaffected."""

from __future__ import annotations

import pathlib

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import build_application
from tests.conftest import make_settings
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata, token


async def test_a_caller_over_its_burst_is_limited_alone(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    app = build_application(
        make_settings(database_url, tmp_path, rate_limit_per_second=0.001, rate_limit_burst=3)
    )
    await app.start()
    try:
        target = f"127.0.0.1:{app.port}"
        noisy_channel = aio.insecure_channel(
            target, interceptors=client_metadata(token(subject="noisy"))
        )
        calm_channel = aio.insecure_channel(
            target, interceptors=client_metadata(token(subject="calm"))
        )
        noisy = payment_service_pb2_grpc.PaymentServiceStub(noisy_channel)
        calm = payment_service_pb2_grpc.PaymentServiceStub(calm_channel)
        for _ in range(3):
            await noisy.ListPayments(api.ListPaymentsRequest())
        error = await rpc_error(noisy.ListPayments(api.ListPaymentsRequest()))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.info.reason == "RATE_LIMITED"
        assert error.has_retry
        assert error.retry.retry_delay.seconds > 0
        await calm.ListPayments(api.ListPaymentsRequest())
        health = health_pb2_grpc.HealthStub(noisy_channel)
        for _ in range(10):
            reply = await health.Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await noisy_channel.close()
        await calm_channel.close()
    finally:
        await app.stop()
