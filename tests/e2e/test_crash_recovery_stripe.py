"""Crash tests with GATEWAY=stripe: a replica SIGKILLs itself at each phase boundary of
Charge and of CapturePayment; restarted under the same INSTANCE_ID, a retry with the same
idempotency-key finishes the operation, and the Stripe-compatible simulator's ledger shows
the money moved exactly once (the adapter sends our gateway keys as Idempotency-Key)."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.adapters.gateways.stripe_simulator import RunningSimulator
from tests.e2e.server_process import ServerProcess, ledger_authorizations, server_env
from tests.helpers.builders import S, charge_request, usd
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata
from tests.stripe_sim import API_KEY, running_simulator

pytestmark = pytest.mark.slow

INSTANCE_ID = "crash-test-stripe"
PHASES = ["before_gateway", "after_gateway", "after_commit"]
CALL_TIMEOUT_S = 30


def replica(
    database_url: str, tmp_path: pathlib.Path, sim: RunningSimulator, fault_point: str = ""
) -> ServerProcess:
    env = server_env(
        database_url,
        tmp_path,
        INSTANCE_ID=INSTANCE_ID,
        FAULT_POINT=fault_point,
        RECOVERY_INTERVAL_SECONDS="3600",
        RECOVERY_STALE_SECONDS="3600",
        GATEWAY="stripe",
        STRIPE_API_KEY=API_KEY,
        STRIPE_API_BASE=sim.base_url,
    )
    return ServerProcess(env, cwd=tmp_path)


@contextlib.asynccontextmanager
async def serving(
    server: ServerProcess, *, crashes: bool
) -> AsyncIterator[payment_service_pb2_grpc.PaymentServiceAsyncStub]:
    await server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        async with aio.insecure_channel(address, interceptors=client_metadata(keys=False)) as ch:
            yield payment_service_pb2_grpc.PaymentServiceStub(ch)
        if crashes:
            assert await server.wait() == -signal.SIGKILL, server.log[-3000:]
        else:
            server.sigterm()
            assert await server.wait() == 0, server.log[-3000:]
    finally:
        server.kill()


@pytest.mark.parametrize("phase", PHASES)
async def test_charge_crash_then_retry_charges_once(
    database_url: str, tmp_path: pathlib.Path, phase: str
) -> None:
    request = charge_request(method=None)
    metadata = (("idempotency-key", f"crash-{uuid.uuid4().hex}"),)
    async with running_simulator(tmp_path) as sim:
        crashing = replica(database_url, tmp_path, sim, f"charge.{phase}")
        async with serving(crashing, crashes=True) as stub:
            lost = await rpc_error(stub.Charge(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
        assert lost.code == grpc.StatusCode.UNAVAILABLE
        async with serving(replica(database_url, tmp_path, sim), crashes=False) as stub:
            answer = await stub.Charge(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        assert answer.payment.status == S.PAYMENT_STATUS_CAPTURED
        assert answer.payment.gateway_reference.startswith("pi_sim_")
    ledger = ledger_authorizations(tmp_path / "stripe-sim-ledger.db")
    assert ledger == {answer.payment.payment_id: 1}, ledger


@pytest.mark.parametrize("phase", PHASES)
async def test_capture_crash_then_retry_captures_once(
    database_url: str, tmp_path: pathlib.Path, phase: str
) -> None:
    async with running_simulator(tmp_path) as sim:
        crashing = replica(database_url, tmp_path, sim, f"capture.{phase}")
        async with serving(crashing, crashes=True) as stub:
            charged = await stub.Charge(
                charge_request(10_000, manual=True),
                metadata=(("idempotency-key", uuid.uuid4().hex),),
                timeout=CALL_TIMEOUT_S,
            )
            capture = api.CapturePaymentRequest(
                payment_id=charged.payment.payment_id, amount=usd(6_000)
            )
            metadata = (("idempotency-key", f"capture-{uuid.uuid4().hex}"),)
            lost = await rpc_error(
                stub.CapturePayment(capture, metadata=metadata, timeout=CALL_TIMEOUT_S)
            )
        assert lost.code == grpc.StatusCode.UNAVAILABLE
        async with serving(replica(database_url, tmp_path, sim), crashes=False) as stub:
            answer = await stub.CapturePayment(capture, metadata=metadata, timeout=CALL_TIMEOUT_S)
        assert answer.payment.status == S.PAYMENT_STATUS_CAPTURED
        assert answer.payment.captured_amount.amount_minor == 6_000
        (charge,) = await sim.simulator_engine.charges_of_payment(charged.payment.payment_id)
        assert charge.captured_minor == 6_000  # captured once at the gateway
