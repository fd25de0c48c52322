"""A replica crashes (SIGKILL) at each phase boundary of Charge, CapturePayment,
CancelPayment and Refund; restarted under the same INSTANCE_ID, a retry with the same
idempotency-key finishes the operation exactly once.

Real server processes on SQLite and PostgreSQL, the generated stub, the simulated
gateway's ledger read from its own SQLite file. The recovery worker is kept out of the
way (long interval, long staleness), so only the client's retry can finish the operation.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.gateways.simulated import SimulatedGateway, SimulatedGatewayConfig
from tests.e2e.server_process import (
    ServerProcess,
    ledger_authorizations,
    ledger_follow_ups,
    server_env,
    stored_money,
    stored_payments,
)
from tests.helpers.builders import S, card, charge_request, usd
from tests.helpers.calls import replayed, replayed_error, rpc_error
from tests.helpers.credentials import client_metadata

pytestmark = pytest.mark.slow

INSTANCE_ID = "crash-test"
PHASES = ["before_gateway", "after_gateway", "after_commit"]
FAULT_POINTS = [f"charge.{phase}" for phase in PHASES]
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


@contextlib.asynccontextmanager
async def connected(
    server: ServerProcess,
) -> AsyncIterator[payment_service_pb2_grpc.PaymentServiceAsyncStub]:
    async with aio.insecure_channel(
        f"127.0.0.1:{server.port}", interceptors=authorized()
    ) as channel:
        yield payment_service_pb2_grpc.PaymentServiceStub(channel)


@contextlib.asynccontextmanager
async def crashing_replica(
    database_url: str, tmp_path: pathlib.Path, fault_point: str
) -> AsyncIterator[payment_service_pb2_grpc.PaymentServiceAsyncStub]:
    """A replica that SIGKILLs itself at `fault_point`: the block's last call kills it."""
    server = replica(database_url, tmp_path, fault_point)
    await server.start()
    try:
        async with connected(server) as stub:
            yield stub
        assert await server.wait() == -signal.SIGKILL, server.log[-3000:]
    finally:
        server.kill()
    assert f"fault point {fault_point} reached" in server.log


@contextlib.asynccontextmanager
async def restarted_replica(
    database_url: str, tmp_path: pathlib.Path
) -> AsyncIterator[payment_service_pb2_grpc.PaymentServiceAsyncStub]:
    """The same INSTANCE_ID again, no fault point; stops cleanly (exit 0) after the block."""
    server = replica(database_url, tmp_path)
    await server.start()
    try:
        async with connected(server) as stub:
            yield stub
        server.sigterm()
        assert await server.wait() == 0, server.log[-3000:]
    finally:
        server.kill()
    assert "Traceback" not in server.log, server.log


@pytest.mark.parametrize("token", list(OUTCOMES))
@pytest.mark.parametrize("fault_point", FAULT_POINTS)
async def test_retry_after_crash_charges_exactly_once(
    database_url: str, fault_point: str, token: str, tmp_path: pathlib.Path
) -> None:
    expected, expected_row_status = OUTCOMES[token]
    request = charge_request(method=card(token))
    metadata = (("idempotency-key", f"crash-{uuid.uuid4().hex}"),)

    async with crashing_replica(database_url, tmp_path, fault_point) as stub:
        lost = await rpc_error(stub.Charge(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
    assert lost.code == grpc.StatusCode.UNAVAILABLE, (lost.code, lost.message)

    async with restarted_replica(database_url, tmp_path) as stub:  # same INSTANCE_ID
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


CHARGED_MINOR = 10_000
CAPTURED_MINOR = 7_000  # partial: the captured amount must come from the claim, not the charge
REFUNDED_MINOR = 3_000


@dataclass(frozen=True)
class Operation:
    """A money-moving RPC on a charged payment and where it must leave the money."""

    rpc: str
    request: Callable[[str], Any]  # payment id -> request message
    manual: bool  # charge with manual capture, so the payment waits AUTHORIZED
    ledger_kind: str
    ledger_amount_minor: int
    status: int
    row_status: str
    captured_minor: int
    refunded_minor: int
    refunds: list[tuple[int, str]]


OPERATIONS = {
    "capture": Operation(
        rpc="CapturePayment",
        request=lambda payment_id: api.CapturePaymentRequest(
            payment_id=payment_id, amount=usd(CAPTURED_MINOR)
        ),
        manual=True,
        ledger_kind="capture",
        ledger_amount_minor=CAPTURED_MINOR,
        status=S.PAYMENT_STATUS_CAPTURED,
        row_status="CAPTURED",
        captured_minor=CAPTURED_MINOR,
        refunded_minor=0,
        refunds=[],
    ),
    "cancel": Operation(
        rpc="CancelPayment",
        request=lambda payment_id: api.CancelPaymentRequest(payment_id=payment_id),
        manual=True,
        ledger_kind="void",
        ledger_amount_minor=0,
        status=S.PAYMENT_STATUS_CANCELED,
        row_status="CANCELED",
        captured_minor=0,
        refunded_minor=0,
        refunds=[],
    ),
    "refund": Operation(
        rpc="Refund",
        request=lambda payment_id: api.RefundRequest(
            payment_id=payment_id,
            amount=usd(REFUNDED_MINOR),
            reason=pb.REFUND_REASON_REQUESTED_BY_CUSTOMER,
        ),
        manual=False,
        ledger_kind="refund",
        ledger_amount_minor=REFUNDED_MINOR,
        status=S.PAYMENT_STATUS_PARTIALLY_REFUNDED,
        row_status="PARTIALLY_REFUNDED",
        captured_minor=CHARGED_MINOR,
        refunded_minor=REFUNDED_MINOR,
        refunds=[(REFUNDED_MINOR, "SUCCEEDED")],
    ),
}


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", list(OPERATIONS))
async def test_retry_after_crash_moves_money_exactly_once(
    database_url: str, name: str, phase: str, tmp_path: pathlib.Path
) -> None:
    operation = OPERATIONS[name]
    fault_point = f"{name}.{phase}"
    metadata = (("idempotency-key", f"crash-{uuid.uuid4().hex}"),)

    # The fault point is on the operation, so the charge before it completes normally.
    async with crashing_replica(database_url, tmp_path, fault_point) as stub:
        charged = await stub.Charge(
            charge_request(CHARGED_MINOR, manual=operation.manual),
            metadata=(("idempotency-key", f"charge-{uuid.uuid4().hex}"),),
            timeout=CALL_TIMEOUT_S,
        )
        charged_status = (
            S.PAYMENT_STATUS_AUTHORIZED if operation.manual else S.PAYMENT_STATUS_CAPTURED
        )
        assert charged.payment.status == charged_status, charged
        payment_id = charged.payment.payment_id
        request = operation.request(payment_id)
        rpc = getattr(stub, operation.rpc)
        lost = await rpc_error(rpc(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
    assert lost.code == grpc.StatusCode.UNAVAILABLE, (lost.code, lost.message)

    async with restarted_replica(database_url, tmp_path) as stub:  # same INSTANCE_ID
        rpc = getattr(stub, operation.rpc)
        retry = rpc(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        answer = await retry
        retry_replayed = await replayed(retry)
        payment = answer.payment
        assert payment.payment_id == payment_id
        assert payment.status == operation.status, answer
        assert payment.captured_amount.amount_minor == operation.captured_minor, answer
        assert payment.refunded_amount.amount_minor == operation.refunded_minor, answer
        if name == "refund":
            assert answer.refund.status == pb.REFUND_STATUS_SUCCEEDED, answer
            assert answer.refund.amount.amount_minor == REFUNDED_MINOR, answer

        third = rpc(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        assert await third == answer
        assert await replayed(third), "the third call with the key must be a replay"

        fetched = await stub.GetPayment(
            api.GetPaymentRequest(payment_id=payment_id), timeout=CALL_TIMEOUT_S
        )
        assert fetched.payment.status == operation.status
        assert fetched.payment.sequence == payment.sequence

    # After the final commit the answer is already stored with it: the retry replays.
    assert retry_replayed == (phase == "after_commit")

    ledger = tmp_path / "gateway.db"
    assert ledger_authorizations(ledger) == {payment_id: 1}
    follow_ups = ledger_follow_ups(ledger, operation.ledger_kind)
    assert follow_ups == {payment_id: [(operation.ledger_amount_minor, True)]}, follow_ups

    stored = await stored_payments(database_url)
    assert list(stored) == [payment_id], stored
    row = stored[payment_id]
    assert row.status == operation.row_status
    sequences = [sequence for sequence, _ in row.events]
    assert sequences == list(range(1, row.sequence + 1)), row
    assert row.sequence == payment.sequence
    charged_row_status = "AUTHORIZED" if operation.manual else "CAPTURED"
    expected_events = ["PENDING", "PROCESSING", charged_row_status, operation.row_status]
    assert [status for _, status in row.events] == expected_events, row

    money = await stored_money(database_url, payment_id)
    assert money.captured_minor == operation.captured_minor, money
    assert money.refunded_minor == operation.refunded_minor, money
    assert money.in_flight == "", money
    assert money.refunds == operation.refunds, money


async def void_at_the_gateway(ledger: pathlib.Path, reference: str) -> None:
    """Someone else voids the authorization at the gateway (its own ledger file)."""
    gateway = SimulatedGateway(SimulatedGatewayConfig(str(ledger)))
    try:
        assert (await gateway.void(reference, f"elsewhere-{uuid.uuid4().hex}")).succeeded
    finally:
        await gateway.close()


async def test_a_gateway_refusal_is_the_answer_even_after_a_crash(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """The gateway refuses a capture (the authorization was voided on its side); the
    replica dies right after recording that. The retry must get the refusal, not the
    unchanged AUTHORIZED payment as if the capture had succeeded."""
    metadata = (("idempotency-key", f"refused-{uuid.uuid4().hex}"),)
    async with crashing_replica(database_url, tmp_path, "capture.after_commit") as stub:
        charged = await stub.Charge(
            charge_request(CHARGED_MINOR, manual=True),
            metadata=(("idempotency-key", f"charge-{uuid.uuid4().hex}"),),
            timeout=CALL_TIMEOUT_S,
        )
        payment_id = charged.payment.payment_id
        await void_at_the_gateway(tmp_path / "gateway.db", charged.payment.gateway_reference)
        request = api.CapturePaymentRequest(payment_id=payment_id)
        lost = await rpc_error(
            stub.CapturePayment(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        )
    assert lost.code == grpc.StatusCode.UNAVAILABLE, (lost.code, lost.message)

    async with restarted_replica(database_url, tmp_path) as stub:  # same INSTANCE_ID
        retry = stub.CapturePayment(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        refused = await rpc_error(retry)
        assert (refused.code, refused.info.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "GATEWAY_REJECTED",
        ), refused.message
        assert await replayed_error(retry)
        fetched = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
        assert fetched.payment.status == S.PAYMENT_STATUS_AUTHORIZED
    assert (await stored_money(database_url, payment_id)).in_flight == ""
