"""Idempotency keys over the wire: replay, reuse, in-flight, retention, what is stored."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import sqlite3
import uuid

import grpc
import pytest
import sqlalchemy as sa
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.adapters.db.tables import idempotency_keys
from payment_grpc.bootstrap import build_application
from payment_grpc.config import Settings
from payment_grpc.pan_masking import looks_like_card_number
from tests.conftest import make_settings
from tests.helpers.builders import S, card, charge_request, keyed, usd
from tests.helpers.calls import RichError, call_like_a_client, replayed, rpc_error
from tests.helpers.credentials import bearer, client_metadata, token
from tests.helpers.db import expire_idempotency_keys, row_counts, stored_key
from tests.helpers.servers import serving


@pytest.fixture
def bare(bare_channel) -> payment_service_pb2_grpc.PaymentServiceStub:
    return payment_service_pb2_grpc.PaymentServiceStub(bare_channel)


def authorizations(app) -> int:  # type: ignore[no-untyped-def]
    with sqlite3.connect(app.settings.ledger_path()) as ledger:
        return ledger.execute("SELECT COUNT(*) FROM ledger WHERE kind='authorize'").fetchone()[0]


# Non-ASCII values cannot even leave a gRPC client (it refuses them as illegal headers).
@pytest.mark.parametrize("key", [None, "", "x" * 256])
async def test_missing_or_malformed_key_is_invalid_and_changes_nothing(bare, app, key) -> None:
    before = await row_counts(app)
    metadata = () if key is None else keyed(key)
    error = await rpc_error(bare.Charge(charge_request(), metadata=metadata))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "INVALID_IDEMPOTENCY_KEY"
    assert error.fields == {"idempotency-key"}
    assert await row_counts(app) == before


@pytest.mark.parametrize(
    "call",
    [
        lambda s, m: s.CapturePayment(api.CapturePaymentRequest(payment_id="pay_x"), metadata=m),
        lambda s, m: s.CancelPayment(api.CancelPaymentRequest(payment_id="pay_x"), metadata=m),
        lambda s, m: s.Refund(api.RefundRequest(payment_id="pay_x"), metadata=m),
    ],
    ids=["capture", "cancel", "refund"],
)
async def test_every_mutating_rpc_requires_a_key(bare, call) -> None:
    error = await rpc_error(call(bare, ()))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == {"idempotency-key"}


async def test_reads_need_no_key(bare) -> None:
    reply = await bare.ListPayments(api.ListPaymentsRequest())
    assert list(reply.payments) == []


async def test_same_key_and_request_replays_exactly_without_a_second_charge(bare, app) -> None:
    request, key = charge_request(), uuid.uuid4().hex
    first = bare.Charge(request, metadata=keyed(key))
    original = await first
    again = bare.Charge(request, metadata=keyed(key))
    replay = await again
    assert replay == original
    assert replay.SerializeToString(deterministic=True) == original.SerializeToString(
        deterministic=True
    )
    assert not await replayed(first)
    assert await replayed(again)
    assert authorizations(app) == 1
    assert (await row_counts(app))["payments"] == 1


async def test_a_stored_decline_is_replayed(bare, app) -> None:
    request, key = charge_request(method=card("tok_chargeDeclined")), uuid.uuid4().hex
    first = await bare.Charge(request, metadata=keyed(key))
    again = bare.Charge(request, metadata=keyed(key))
    assert (await again) == first
    assert first.payment.status == S.PAYMENT_STATUS_FAILED
    assert await replayed(again)
    assert authorizations(app) == 1


async def test_same_key_with_another_request_is_rejected(bare, app) -> None:
    key = uuid.uuid4().hex
    await bare.Charge(charge_request(1_000, order_id="ord_reuse"), metadata=keyed(key))
    error = await rpc_error(
        bare.Charge(charge_request(2_000, order_id="ord_reuse"), metadata=keyed(key))
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "IDEMPOTENCY_KEY_REUSED"
    assert (await row_counts(app))["payments"] == 1
    assert authorizations(app) == 1


async def test_keys_are_scoped_per_method(bare) -> None:
    key = uuid.uuid4().hex
    charged = await bare.Charge(charge_request(), metadata=keyed(key))
    refunded = await bare.Refund(
        api.RefundRequest(payment_id=charged.payment.payment_id, amount=usd(100)),
        metadata=keyed(key),
    )
    assert refunded.payment.refunded_amount.amount_minor == 100


async def test_business_error_is_stored_and_replayed(bare) -> None:
    charged = await bare.Charge(charge_request(1_000), metadata=keyed(uuid.uuid4().hex))
    over = api.RefundRequest(payment_id=charged.payment.payment_id, amount=usd(5_000))
    key = uuid.uuid4().hex
    first = await rpc_error(bare.Refund(over, metadata=keyed(key)))
    again = bare.Refund(over, metadata=keyed(key))
    replayed = await rpc_error(again)
    assert first.code == replayed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert replayed.info == first.info
    assert replayed.message == first.message
    assert ("idempotent-replayed", "true") in list(await again.trailing_metadata())


async def test_validation_failure_is_not_stored(bare, app) -> None:
    key = uuid.uuid4().hex
    bad = charge_request(0)
    error = await rpc_error(bare.Charge(bad, metadata=keyed(key)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    good = await bare.Charge(charge_request(), metadata=keyed(key))
    assert good.payment.status == S.PAYMENT_STATUS_CAPTURED


# ---------------------------------------------------------------- not stored: a retry runs again


async def _ran_again(call) -> None:  # type: ignore[no-untyped-def]
    """The retry executed (a fresh capture), it was no replay of the earlier failure."""
    answer = await call
    assert not await replayed(call)
    assert answer.payment.status == S.PAYMENT_STATUS_CAPTURED


async def test_auth_failures_are_not_stored(bare, app) -> None:
    request, key = charge_request(), uuid.uuid4().hex
    forged = bearer(token(secret="not-our-secret-but-long-enough-for-hs256-0123456789"))
    error = await rpc_error(bare.Charge(request, metadata=(*keyed(key), forged)))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    read_only = bearer(token(("payments.read",)))  # the same subject, so the same key scope
    error = await rpc_error(bare.Charge(request, metadata=(*keyed(key), read_only)))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    await _ran_again(bare.Charge(request, metadata=keyed(key)))
    assert (await row_counts(app))["payments"] == 1


async def test_rate_limited_is_not_stored(database_url: str, tmp_path: pathlib.Path) -> None:
    limited = make_settings(database_url, tmp_path, rate_limit_per_second=0.001, rate_limit_burst=1)
    other = make_settings(database_url, tmp_path, instance_id="replica-b")
    async with serving(limited) as (_, stub), serving(other) as (_, retry_stub):
        await stub.ListPayments(api.ListPaymentsRequest())  # the caller's only token
        request, key = charge_request(), uuid.uuid4().hex
        error = await rpc_error(stub.Charge(request, metadata=keyed(key)))
        assert (error.code, error.info.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
        await _ran_again(retry_stub.Charge(request, metadata=keyed(key)))  # another replica


async def test_unavailable_auth_is_not_stored(database_url: str, tmp_path: pathlib.Path) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        auth_down = make_settings(
            database_url,
            tmp_path,
            auth_service_addr=f"127.0.0.1:{closed.getsockname()[1]}",
            auth_timeout_seconds=0.2,
        )
        other = make_settings(database_url, tmp_path, instance_id="replica-b")
        async with serving(auth_down) as (_, stub), serving(other) as (_, retry_stub):
            request, key = charge_request(), uuid.uuid4().hex
            error = await rpc_error(stub.Charge(request, metadata=keyed(key)))
            assert (error.code, error.info.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "AUTH_UNAVAILABLE",
            )
            await _ran_again(retry_stub.Charge(request, metadata=keyed(key)))


def _slow_gateway(database_url: str, tmp_path: pathlib.Path, latency_ms: int) -> Settings:
    return make_settings(
        database_url, tmp_path, gateway_latency_ms_min=latency_ms, gateway_latency_ms_max=latency_ms
    )


async def test_deadline_exceeded_is_not_stored(database_url: str, tmp_path: pathlib.Path) -> None:
    async with serving(_slow_gateway(database_url, tmp_path, 1_000)) as (app, stub):
        request, key = charge_request(), uuid.uuid4().hex
        error = await rpc_error(stub.Charge(request, metadata=keyed(key), timeout=0.2))
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        answer, was_replayed = await call_like_a_client(
            lambda: stub.Charge(request, metadata=keyed(key), timeout=30)
        )
        assert not was_replayed
        assert answer.payment.status == S.PAYMENT_STATUS_CAPTURED
        assert (await row_counts(app))["payments"] == 1  # the retry resumed the same payment
        assert authorizations(app) == 1


async def test_aborted_operation_in_progress_is_not_stored(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(_slow_gateway(database_url, tmp_path, 300)) as (_, stub):
        charged = await stub.Charge(charge_request(manual=True), metadata=keyed(uuid.uuid4().hex))
        capture = api.CapturePaymentRequest(payment_id=charged.payment.payment_id)
        keys = [uuid.uuid4().hex, uuid.uuid4().hex]
        answers = await asyncio.gather(
            *(stub.CapturePayment(capture, metadata=keyed(k)) for k in keys),
            return_exceptions=True,
        )
        [(key, refused)] = [(k, a) for k, a in zip(keys, answers, strict=True) if _failed(a)]
        rich = RichError(refused)
        assert (rich.code, rich.info.reason) == (
            grpc.StatusCode.ABORTED,
            "PAYMENT_OPERATION_IN_PROGRESS",
        )
        assert rich.has_retry
        # The retry runs again: the payment is captured by now, which its state check says
        # (a business outcome, so that one is stored and replayed).
        retry = stub.CapturePayment(capture, metadata=keyed(key))
        error = await rpc_error(retry)
        assert (error.code, error.info.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "PAYMENT_UNEXPECTED_STATE",
        )
        assert ("idempotent-replayed", "true") not in list(await retry.trailing_metadata())
        again = stub.CapturePayment(capture, metadata=keyed(key))
        assert (await rpc_error(again)).info == error.info
        assert ("idempotent-replayed", "true") in list(await again.trailing_metadata())


def _failed(answer: object) -> bool:
    return isinstance(answer, grpc.aio.AioRpcError)


# ---------------------------------------------------------------- concurrency


async def test_fifty_concurrent_charges_with_one_key_charge_once(bare, app) -> None:
    request, key = charge_request(), uuid.uuid4().hex
    calls = [bare.Charge(request, metadata=keyed(key)) for _ in range(50)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    wins = _one_execution(answers, api.ChargeResponse)  # each other answer: ABORTED + RetryInfo
    payments = {a.payment.payment_id for a in wins}
    assert len(payments) == 1
    assert authorizations(app) == 1
    retries = [bare.Charge(request, metadata=keyed(key)) for _ in range(5)]
    for retry in retries:
        assert (await retry).payment.payment_id in payments
        assert await replayed(retry)
    assert (await row_counts(app))["payments"] == 1


async def test_stored_answers_hold_no_payment_method_token(bare, app) -> None:
    """Read decrypted through the repository: the answer is exactly the API's messages."""
    charge_key, refund_key = uuid.uuid4().hex, uuid.uuid4().hex
    request = charge_request(method=card("tok_mastercard"))
    charged = await bare.Charge(request, metadata=keyed(charge_key))
    refund = api.RefundRequest(payment_id=charged.payment.payment_id, amount=usd(100))
    refunded = await bare.Refund(refund, metadata=keyed(refund_key))
    shown = await bare.GetPayment(api.GetPaymentRequest(payment_id=charged.payment.payment_id))
    charge_body = await _stored_body(app, "Charge", charge_key)
    refund_body = await _stored_body(app, "Refund", refund_key)
    assert api.ChargeResponse.FromString(charge_body) == charged
    assert api.RefundResponse.FromString(refund_body) == refunded
    assert api.RefundResponse.FromString(refund_body).payment == shown.payment


async def _stored_body(app, rpc: str, key: str) -> bytes:  # type: ignore[no-untyped-def]
    record = await stored_key(app, rpc, key)
    assert record is not None
    assert record.response_code == 0
    assert record.response_body
    text = record.response_body.decode("latin-1")
    assert "tok_mastercard" not in text
    assert not looks_like_card_number(text), text
    return record.response_body


async def test_expired_key_is_a_new_request_and_is_reaped(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    app = build_application(make_settings(database_url, tmp_path, idempotency_retention_hours=1e-9))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata(keys=False)
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            first = await stub.Charge(charge_request(1_000), metadata=keyed("k-exp"))
            second = await stub.Charge(charge_request(2_000), metadata=keyed("k-exp"))
        assert second.payment.payment_id != first.payment.payment_id
        await app.keys.reap()
        async with app.engine.connect() as conn:
            left = (
                await conn.execute(sa.select(sa.func.count()).select_from(idempotency_keys))
            ).scalar_one()
        assert left == 0
    finally:
        await app.stop()


RACE_ROUNDS = 5
RACERS = 12


def _one_execution(answers: list[object], response_type: type) -> list[object]:
    """The successful answers; every other answer must be 'key in use, retry'."""
    for answer in answers:
        if isinstance(answer, response_type):
            continue
        assert isinstance(answer, grpc.aio.AioRpcError), answer
        rich = RichError(answer)
        assert (rich.code, rich.info.reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_IN_USE")
        assert rich.has_retry
    return [a for a in answers if isinstance(a, response_type)]


async def test_concurrent_refunds_reusing_an_expired_key_execute_once(bare, app) -> None:
    charged = await bare.Charge(charge_request(100_000), metadata=keyed(uuid.uuid4().hex))
    payment_id = charged.payment.payment_id
    request, key = api.RefundRequest(payment_id=payment_id, amount=usd(100)), uuid.uuid4().hex
    await bare.Refund(request, metadata=keyed(key))
    for executions in range(2, RACE_ROUNDS + 2):
        await expire_idempotency_keys(app)
        answers = await asyncio.gather(
            *(bare.Refund(request, metadata=keyed(key)) for _ in range(RACERS)),
            return_exceptions=True,
        )
        wins = _one_execution(answers, api.RefundResponse)
        assert len({w.refund.refund_id for w in wins}) == 1, wins
        assert (await row_counts(app))["refunds"] == executions
        after = await bare.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
        assert after.payment.refunded_amount.amount_minor == 100 * executions


async def test_concurrent_charges_reusing_an_expired_key_execute_once(bare, app) -> None:
    # A decline leaves the order chargeable, so every execution would reach the gateway.
    request, key = charge_request(method=card("tok_chargeDeclined")), uuid.uuid4().hex
    await bare.Charge(request, metadata=keyed(key))
    for executions in range(2, RACE_ROUNDS + 2):
        await expire_idempotency_keys(app)
        answers = await asyncio.gather(
            *(bare.Charge(request, metadata=keyed(key)) for _ in range(RACERS)),
            return_exceptions=True,
        )
        wins = _one_execution(answers, api.ChargeResponse)
        assert len({w.payment.payment_id for w in wins}) == 1, wins
        assert authorizations(app) == executions
        assert (await row_counts(app))["payments"] == executions
