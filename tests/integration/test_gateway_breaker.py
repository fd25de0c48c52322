"""The circuit breaker around GATEWAY=stripe: open -> Charge is UNAVAILABLE
GATEWAY_UNAVAILABLE with RetryInfo and the gateway is not called, and the readiness of
payments.v1.PaymentService is NOT_SERVING (liveness stays SERVING); half-open -> one trial
call decides (success closes, failure opens again)."""

from __future__ import annotations

import pathlib

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from payment_grpc.adapters.gateways.guarded import GuardedGateway
from payment_grpc.api.server import SERVICE_NAME
from tests.helpers.builders import S, charge_request
from tests.helpers.calls import rpc_error
from tests.stripe_sim import payment_stub, running_simulator, stripe_service


async def test_open_breaker_refuses_charges_without_calling_the_gateway(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with (
        running_simulator(tmp_path) as sim,
        stripe_service(
            database_url,
            tmp_path,
            sim,
            gateway_retry_attempts=1,
            gateway_breaker_failures=2,
            gateway_breaker_open_seconds=600,
        ) as app,
        payment_stub(app) as stub,
    ):
        sim.simulator.faults.add(["server_error", "server_error"])
        for _ in range(2):
            reply = await stub.Charge(charge_request(1_000))
            assert reply.payment.status == S.PAYMENT_STATUS_PROCESSING  # unknown, not FAILED
        assert isinstance(app.gateway, GuardedGateway)
        assert not app.gateway.available()

        error = await rpc_error(stub.Charge(charge_request(1_000)))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.info.reason == "GATEWAY_UNAVAILABLE"
        assert error.has_retry
        assert await sim.simulator_engine.authorization_count() == 0  # never called

        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            readiness = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            async for reply in readiness:  # the health monitor notices the open breaker
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
            readiness.cancel()
            alive = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert alive.status == health_pb2.HealthCheckResponse.SERVING  # liveness stays


async def test_half_open_trial_closes_or_reopens(database_url: str, tmp_path: pathlib.Path) -> None:
    async with (
        running_simulator(tmp_path) as sim,
        stripe_service(
            database_url,
            tmp_path,
            sim,
            gateway_retry_attempts=1,
            gateway_breaker_failures=1,
            gateway_breaker_open_seconds=0.001,  # half-open by the next call
        ) as app,
        payment_stub(app) as stub,
    ):
        assert isinstance(app.gateway, GuardedGateway)
        sim.simulator.faults.add(["server_error", "server_error"])
        await stub.Charge(charge_request(1_000))  # opens
        failed_trial = await stub.Charge(charge_request(1_000))  # half-open trial fails
        assert failed_trial.payment.status == S.PAYMENT_STATUS_PROCESSING
        assert app.gateway.opened_at is not None  # opened again
        trial = await stub.Charge(charge_request(1_000))  # half-open trial succeeds
        assert trial.payment.status == S.PAYMENT_STATUS_CAPTURED
        assert app.gateway.available()
        assert app.gateway.opened_at is None  # closed
