"""A replica crashes (SIGKILL) at each phase boundary of Charge; restarted under the same
INSTANCE_ID, a retry with the same idempotency-key finishes the charge exactly once.

Real server processes on SQLite and PostgreSQL, the generated stub, the simulated
gateway's ledger read from its own SQLite file. The recovery worker is kept out of the
way (long interval, long staleness), so only the client's retry can finish the charge.
"""

from __future__ import annotations

import pathlib
import signal
import uuid
from typing import Any

import grpc
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from tests.e2e.server_process import (
    ServerProcess,
    ledger_authorizations,
    server_env,
    stored_payments,
)
from tests.helpers import S, card, charge_request, client_metadata, rpc_error

pytestmark = pytest.mark.slow

INSTANCE_ID = "crash-test"
FAULT_POINTS = ["charge.before_gateway", "charge.after_gateway", "charge.after_commit"]
OUTCOMES = {
    "tok_visa": (S.PAYMENT_STATUS_CAPTURED, "CAPTURED"),
    "tok_chargeDeclined": (S.PAYMENT_STATUS_FAILED, "FAILED"),
}
CALL_TIMEOUT_S = 30


def authorized() -> list[Any]:
    """A bearer token on every call; the test sets idempotency-key itself."""
    return client_metadata(keys=False)


def replica(database_url: str, tmp_path: pathlib.Path, fault_point: str = "") -> ServerProcess:
    env = server_env(
        database_url,
        tmp_path,
        INSTANCE_ID=INSTANCE_ID,
        FAULT_POINT=fault_point,
        RECOVERY_INTERVAL_SECONDS="3600",
        RECOVERY_STALE_SECONDS="3600",
    )
    return ServerProcess(env, cwd=tmp_path)


async def replayed(call: Any) -> bool:
    metadata = await call.initial_metadata()
    return metadata is not None and metadata.get("idempotent-replayed") == "true"


@pytest.mark.parametrize("token", list(OUTCOMES))
@pytest.mark.parametrize("fault_point", FAULT_POINTS)
async def test_retry_after_crash_charges_exactly_once(
    database_url: str, fault_point: str, token: str, tmp_path: pathlib.Path
) -> None:
    expected, expected_row_status = OUTCOMES[token]
    request = charge_request(method=card(token))
    metadata = (("idempotency-key", f"crash-{uuid.uuid4().hex}"),)

    crashing = replica(database_url, tmp_path, fault_point)
    await crashing.start()
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{crashing.port}", interceptors=authorized()
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            lost = await rpc_error(stub.Charge(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
        assert lost.code == grpc.StatusCode.UNAVAILABLE, (lost.code, lost.message)
        assert await crashing.wait() == -signal.SIGKILL, crashing.log[-3000:]
    finally:
        crashing.kill()
    assert f"fault point {fault_point} reached" in crashing.log

    restarted = replica(database_url, tmp_path)  # same INSTANCE_ID, no fault point
    await restarted.start()
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{restarted.port}", interceptors=authorized()
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            retry = stub.Charge(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            answer = await retry
            retry_replayed = await replayed(retry)
            payment = answer.payment
            assert payment.status == expected, answer

            third = stub.Charge(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            assert await third == answer
            assert await replayed(third), "the third call with the key must be a replay"

            fetched = await stub.GetPayment(
                api.GetPaymentRequest(payment_id=payment.payment_id), timeout=CALL_TIMEOUT_S
            )
            assert fetched.payment.status == expected
            assert fetched.payment.sequence == payment.sequence
        restarted.sigterm()
        assert await restarted.wait() == 0, restarted.log[-3000:]
    finally:
        restarted.kill()
    assert "Traceback" not in restarted.log, restarted.log

    # After the final commit the answer is already stored with it: the retry replays.
    assert retry_replayed == (fault_point == "charge.after_commit")

    ledger = ledger_authorizations(tmp_path / "gateway.db")
    assert ledger == {payment.payment_id: 1}, ledger

    stored = await stored_payments(database_url)
    assert list(stored) == [payment.payment_id], stored
    row = stored[payment.payment_id]
    assert row.status == expected_row_status
    sequences = [sequence for sequence, _ in row.events]
    assert sequences == list(range(1, row.sequence + 1)), row
    assert row.sequence == payment.sequence
    assert [status for _, status in row.events] == ["PENDING", "PROCESSING", expected_row_status]
