"""Idempotency keys over the wire: replay, reuse, in-flight, retention, what is stored."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import uuid

import grpc
import pytest
import sqlalchemy as sa
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.adapters.db.tables import idempotency_keys
from payment_grpc.bootstrap import build_application
from tests.conftest import make_settings
from tests.helpers import S, card, charge_request, client_metadata, row_counts, rpc_error, usd


@pytest.fixture
def bare(bare_channel) -> payment_service_pb2_grpc.PaymentServiceStub:
    return payment_service_pb2_grpc.PaymentServiceStub(bare_channel)


def keyed(key: str) -> tuple[tuple[str, str], ...]:
    return (("idempotency-key", key),)


def authorizations(app) -> int:  # type: ignore[no-untyped-def]
    with sqlite3.connect(app.settings.ledger_path()) as ledger:
        return ledger.execute("SELECT COUNT(*) FROM ledger WHERE kind='authorize'").fetchone()[0]


async def _replayed(call) -> bool:  # type: ignore[no-untyped-def]
    metadata = await call.initial_metadata()
    return ("idempotent-replayed", "true") in list(metadata or ())


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
    assert not await _replayed(first)
    assert await _replayed(again)
    assert authorizations(app) == 1
    assert (await row_counts(app))["payments"] == 1


async def test_a_stored_decline_is_replayed(bare, app) -> None:
    request, key = charge_request(method=card("tok_chargeDeclined")), uuid.uuid4().hex
    first = await bare.Charge(request, metadata=keyed(key))
    again = bare.Charge(request, metadata=keyed(key))
    assert (await again) == first
    assert first.payment.status == S.PAYMENT_STATUS_FAILED
    assert await _replayed(again)
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


async def test_fifty_concurrent_charges_with_one_key_charge_once(bare, app) -> None:
    request, key = charge_request(), uuid.uuid4().hex
    calls = [bare.Charge(request, metadata=keyed(key)) for _ in range(50)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    payments = {a.payment.payment_id for a in answers if isinstance(a, api.ChargeResponse)}
    errors = [a for a in answers if not isinstance(a, api.ChargeResponse)]
    assert len(payments) == 1
    for error in errors:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.ABORTED
    if errors:
        rich = await rpc_error(_raise(errors[0]))
        assert rich.info.reason == "IDEMPOTENCY_KEY_IN_USE"
        assert rich.has_retry
    assert authorizations(app) == 1
    retries = [bare.Charge(request, metadata=keyed(key)) for _ in range(5)]
    for retry in retries:
        assert (await retry).payment.payment_id in payments
        assert await _replayed(retry)
    assert (await row_counts(app))["payments"] == 1


async def _raise(error: BaseException) -> None:
    raise error


async def test_stored_answers_hold_no_payment_method_token(bare, app) -> None:
    await bare.Charge(charge_request(method=card("tok_mastercard")), metadata=keyed("k-1"))
    async with app.engine.connect() as conn:
        bodies = (await conn.execute(sa.select(idempotency_keys.c.response_body))).scalars().all()
    assert bodies
    assert all(b"tok_mastercard" not in body for body in bodies)


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
