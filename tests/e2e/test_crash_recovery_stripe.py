"""Crash tests with GATEWAY=stripe: a replica SIGKILLs itself at each phase boundary of
Charge, CapturePayment, CancelPayment and Refund; restarted under the same INSTANCE_ID, a
retry with the same idempotency-key finishes the operation, and the Stripe-compatible
simulator's ledger shows the money moved exactly once (the adapter sends our gateway keys
as Idempotency-Key)."""

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
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.gateways.stripe_simulator import RunningSimulator
from tests.e2e.server_process import (
    ServerProcess,
    ledger_authorizations,
    ledger_follow_ups,
    server_env,
    stored_money,
    stored_payments,
)
from tests.helpers.builders import S, charge_request, usd
from tests.helpers.calls import replayed, rpc_error
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


CHARGED_MINOR = 10_000
REFUNDED_MINOR = 3_000


@pytest.mark.parametrize("phase", PHASES)
async def test_cancel_crash_then_retry_voids_once(
    database_url: str, tmp_path: pathlib.Path, phase: str
) -> None:
    metadata = (("idempotency-key", f"cancel-{uuid.uuid4().hex}"),)
    async with running_simulator(tmp_path) as sim:
        crashing = replica(database_url, tmp_path, sim, f"cancel.{phase}")
        async with serving(crashing, crashes=True) as stub:
            charged = await stub.Charge(
                charge_request(CHARGED_MINOR, manual=True),
                metadata=(("idempotency-key", uuid.uuid4().hex),),
                timeout=CALL_TIMEOUT_S,
            )
            assert charged.payment.status == S.PAYMENT_STATUS_AUTHORIZED, charged
            payment_id = charged.payment.payment_id
            cancel = api.CancelPaymentRequest(payment_id=payment_id)
            lost = await rpc_error(
                stub.CancelPayment(cancel, metadata=metadata, timeout=CALL_TIMEOUT_S)
            )
        assert lost.code == grpc.StatusCode.UNAVAILABLE
        async with serving(replica(database_url, tmp_path, sim), crashes=False) as stub:
            retry = stub.CancelPayment(cancel, metadata=metadata, timeout=CALL_TIMEOUT_S)
            answer = await retry
            assert await replayed(retry) == (phase == "after_commit")
            third = stub.CancelPayment(cancel, metadata=metadata, timeout=CALL_TIMEOUT_S)
            assert await third == answer
            assert await replayed(third)
        assert answer.payment.status == S.PAYMENT_STATUS_CANCELED, answer
        assert answer.payment.captured_amount.amount_minor == 0
        (charge,) = await sim.simulator_engine.charges_of_payment(payment_id)
        assert charge.voided  # canceled at the gateway
        assert charge.captured_minor == 0
    ledger = tmp_path / "stripe-sim-ledger.db"
    assert ledger_authorizations(ledger) == {payment_id: 1}
    assert ledger_follow_ups(ledger, "void") == {payment_id: [(0, True)]}  # voided once
    row = (await stored_payments(database_url))[payment_id]
    assert [status for _, status in row.events] == [
        "PENDING",
        "PROCESSING",
        "AUTHORIZED",
        "CANCELED",
    ], row
    assert (await stored_money(database_url, payment_id)).in_flight == ""


@pytest.mark.parametrize("phase", PHASES)
async def test_refund_crash_then_retry_refunds_once(
    database_url: str, tmp_path: pathlib.Path, phase: str
) -> None:
    metadata = (("idempotency-key", f"refund-{uuid.uuid4().hex}"),)
    async with running_simulator(tmp_path) as sim:
        crashing = replica(database_url, tmp_path, sim, f"refund.{phase}")
        async with serving(crashing, crashes=True) as stub:
            charged = await stub.Charge(
                charge_request(CHARGED_MINOR),
                metadata=(("idempotency-key", uuid.uuid4().hex),),
                timeout=CALL_TIMEOUT_S,
            )
            assert charged.payment.status == S.PAYMENT_STATUS_CAPTURED, charged
            payment_id = charged.payment.payment_id
            refund = api.RefundRequest(
                payment_id=payment_id,
                amount=usd(REFUNDED_MINOR),
                reason=pb.REFUND_REASON_REQUESTED_BY_CUSTOMER,
            )
            lost = await rpc_error(stub.Refund(refund, metadata=metadata, timeout=CALL_TIMEOUT_S))
        assert lost.code == grpc.StatusCode.UNAVAILABLE
        async with serving(replica(database_url, tmp_path, sim), crashes=False) as stub:
            retry = stub.Refund(refund, metadata=metadata, timeout=CALL_TIMEOUT_S)
            answer = await retry
            assert await replayed(retry) == (phase == "after_commit")
            third = stub.Refund(refund, metadata=metadata, timeout=CALL_TIMEOUT_S)
            assert await third == answer
            assert await replayed(third)
        assert answer.payment.status == S.PAYMENT_STATUS_PARTIALLY_REFUNDED, answer
        assert answer.payment.refunded_amount.amount_minor == REFUNDED_MINOR
        assert answer.refund.status == pb.REFUND_STATUS_SUCCEEDED, answer
        assert answer.refund.gateway_reference.startswith("re_"), answer
        (charge,) = await sim.simulator_engine.charges_of_payment(payment_id)
        assert charge.refunded_minor == REFUNDED_MINOR  # refunded once at the gateway
        assert [r.key for r in charge.refunds] == [answer.refund.refund_id]
    ledger = tmp_path / "stripe-sim-ledger.db"
    assert ledger_authorizations(ledger) == {payment_id: 1}
    assert ledger_follow_ups(ledger, "refund") == {payment_id: [(REFUNDED_MINOR, True)]}
    money = await stored_money(database_url, payment_id)
    assert money.refunded_minor == REFUNDED_MINOR, money
    assert money.refunds == [(REFUNDED_MINOR, "SUCCEEDED")], money
