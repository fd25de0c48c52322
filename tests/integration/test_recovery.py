"""The recovery worker over the wire: it settles payments a lost gateway answer left
PROCESSING, answers idempotency keys their callers abandoned (so the retry is a replay),
releases keys that never got past their claim, keeps going when one item fails, and does
each of these once with two replicas running it at the same time."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sqlite3
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.message import Message
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.adapters.db.tables import idempotency_keys, payments
from payment_grpc.api.interceptors.idempotency import fingerprint
from payment_grpc.bootstrap import Application
from payment_grpc.service.ports import KeyRecord, Operation, RecoveryPoint
from tests.conftest import make_settings
from tests.helpers.builders import S, card, charge_request, keyed, usd
from tests.helpers.calls import replayed, replayed_error, rpc_error
from tests.helpers.db import (
    abandon_key,
    events_of,
    expire_idempotency_keys,
    insert_pending_refund,
    refund_status,
    row_counts,
    stored_key,
)
from tests.helpers.servers import serving

SUBJECT = "svc-tests"  # the subject of the tests' admin token: the keys' scope
CHARGE = "/payments.v1.PaymentService/Charge"
# Every authorization reaches the gateway, but its answer never comes back.
LOST_ANSWERS: dict[str, Any] = {
    "gateway_success_rate": 0,
    "gateway_failure_mix": "declined=0,insufficient_funds=0,network_error=1,invalid_method=0",
}
WORKER_PASSES_TIMEOUT_S = 30
LONG_AGO = timedelta(hours=1)  # beyond IDEMPOTENCY_LOCK_TIMEOUT_SECONDS (60 s)


def authorizations(app: Application) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(app.settings.ledger_path())) as ledger:
        rows = ledger.execute(
            "SELECT payment_id, COUNT(*) FROM ledger WHERE kind = 'authorize' GROUP BY payment_id"
        ).fetchall()
    return dict(rows)


async def statuses(app: Application, payment_id: str) -> list[str]:
    return [status for _, _, status in await events_of(app, payment_id)]


async def charge_with_lost_answer(stub: Any, key: str) -> tuple[api.ChargeRequest, str]:
    request = charge_request(method=card(f"tok_unknown_{uuid.uuid4().hex[:8]}"))
    first = await stub.Charge(request, metadata=keyed(key))
    assert first.payment.status == S.PAYMENT_STATUS_PROCESSING  # unknown, never FAILED
    assert not first.payment.HasField("failure")
    return request, first.payment.payment_id


async def assert_retry_replays_the_capture(
    app: Application, stub: Any, request: api.ChargeRequest, key: str, payment_id: str
) -> None:
    call = stub.Charge(request, metadata=keyed(key))
    answer = await call
    assert await replayed(call)
    shown = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
    assert answer.payment == shown.payment
    assert answer.payment.status == S.PAYMENT_STATUS_CAPTURED
    assert authorizations(app)[payment_id] == 1
    assert await statuses(app, payment_id) == ["PENDING", "PROCESSING", "CAPTURED"]


async def test_a_recovery_pass_answers_a_key_whose_gateway_answer_was_lost(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path, **LOST_ANSWERS)) as (app, stub):
        key = uuid.uuid4().hex
        request, payment_id = await charge_with_lost_answer(stub, key)
        before = await stored_key(app, "Charge", key)
        assert before is not None
        assert before.recovery_point is RecoveryPoint.PAYMENT_CREATED
        report = await app.recovery.run_once()
        assert (report.settled, report.keys) == (1, 1)
        await assert_retry_replays_the_capture(app, stub, request, key, payment_id)


async def test_the_periodic_worker_answers_abandoned_keys(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(database_url, tmp_path, recovery_interval_seconds=0.05, **LOST_ANSWERS)
    async with serving(settings) as (app, stub):
        key = uuid.uuid4().hex
        request, payment_id = await charge_with_lost_answer(stub, key)
        # The second pass from now began after the charge had answered and let go of its key.
        passes = app.recovery.wait_for_passes(app.recovery.completed_passes + 2)
        await asyncio.wait_for(passes, WORKER_PASSES_TIMEOUT_S)
        await assert_retry_replays_the_capture(app, stub, request, key, payment_id)


async def test_a_gateway_timeout_never_fails_a_payment(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path, **LOST_ANSWERS)) as (app, stub):
        charged = [await charge_with_lost_answer(stub, uuid.uuid4().hex) for _ in range(5)]
        for _, payment_id in charged:
            shown = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
            assert shown.payment.status == S.PAYMENT_STATUS_PROCESSING
        await app.recovery.run_once()
        for _, payment_id in charged:
            assert await statuses(app, payment_id) == ["PENDING", "PROCESSING", "CAPTURED"]
        assert authorizations(app) == {payment_id: 1 for _, payment_id in charged}


@pytest.fixture
async def bare(app, bare_channel) -> payment_service_pb2_grpc.PaymentServiceStub:  # type: ignore[no-untyped-def]
    """Once the worker's start-up pass is done, the passes a test runs are the only ones."""
    await app.recovery.wait_for_passes(1)
    return payment_service_pb2_grpc.PaymentServiceStub(bare_channel)


async def test_a_key_stuck_at_its_claim_is_released_and_a_retry_runs_fresh(app, bare) -> None:
    request, key = charge_request(), uuid.uuid4().hex
    # Claimed by a replica that died before creating anything.
    claimed = await app.keys.begin(SUBJECT, Operation.CHARGE, key, fingerprint(CHARGE, request))
    assert isinstance(claimed, KeyRecord)
    await abandon_key(app, "Charge", key, RecoveryPoint.STARTED, locked_at=_ago(LONG_AGO))
    report = await app.recovery.run_once()
    assert report.keys == 1
    assert await stored_key(app, "Charge", key) is None
    call = bare.Charge(request, metadata=keyed(key))
    answer = await call
    assert not await replayed(call)
    assert answer.payment.status == S.PAYMENT_STATUS_CAPTURED
    assert (await row_counts(app))["payments"] == 1


async def test_a_key_held_by_a_live_execution_is_left_alone(app, bare) -> None:
    request, key = charge_request(), uuid.uuid4().hex
    claimed = await app.keys.begin(SUBJECT, Operation.CHARGE, key, fingerprint(CHARGE, request))
    assert isinstance(claimed, KeyRecord)
    report = await app.recovery.run_once()
    assert report.keys == 0
    assert await stored_key(app, "Charge", key) == claimed
    error = await rpc_error(bare.Charge(request, metadata=keyed(key)))
    assert (error.code, error.info.reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_IN_USE")


# (RPC, its request for the target payment, where a crash leaves its key once the money
# side is done: the recovery worker recorded the outcome, nobody stored the answer)
CRASHED_AFTER_THE_MONEY_MOVED: list[tuple[str, Callable[[str], Message], RecoveryPoint]] = [
    ("Charge", lambda _: charge_request(), RecoveryPoint.PAYMENT_CREATED),
    (
        "CapturePayment",
        lambda pid: api.CapturePaymentRequest(payment_id=pid),
        RecoveryPoint.OPERATION_CLAIMED,
    ),
    (
        "CancelPayment",
        lambda pid: api.CancelPaymentRequest(payment_id=pid),
        RecoveryPoint.OPERATION_CLAIMED,
    ),
    (
        "Refund",
        lambda pid: api.RefundRequest(payment_id=pid, amount=usd(100)),
        RecoveryPoint.REFUND_CREATED,
    ),
]


@pytest.mark.parametrize(
    ("rpc", "build", "point"),
    CRASHED_AFTER_THE_MONEY_MOVED,
    ids=[rpc for rpc, _, _ in CRASHED_AFTER_THE_MONEY_MOVED],
)
async def test_an_abandoned_key_past_its_first_phase_gets_the_answer_a_retry_would_store(
    app, bare, rpc: str, build: Callable[[str], Message], point: RecoveryPoint
) -> None:
    manual = rpc in ("CapturePayment", "CancelPayment")
    target = await bare.Charge(charge_request(manual=manual), metadata=keyed(uuid.uuid4().hex))
    request, key = build(target.payment.payment_id), uuid.uuid4().hex
    send = getattr(bare, rpc)
    original = await send(request, metadata=keyed(key))
    await abandon_key(app, rpc, key, point, locked_at=_ago(LONG_AGO))
    report = await app.recovery.run_once()
    assert report.keys == 1
    finished = await stored_key(app, rpc, key)
    assert finished is not None
    assert finished.recovery_point is RecoveryPoint.FINISHED
    assert finished.response_body == original.SerializeToString(deterministic=True)
    again = send(request, metadata=keyed(key))
    assert await again == original
    assert await replayed(again)


@pytest.mark.parametrize("answered_by", ["recovery", "retry"])
async def test_a_capture_the_gateway_refused_is_answered_as_refused(
    app, bare, answered_by: str
) -> None:
    """The claim was released because the gateway refused (the authorization was voided on
    its side), but the key lost its stored refusal (as when the recovery worker, which
    holds no key, recorded it). Neither the worker nor the retry may call that a success."""
    charged = await bare.Charge(charge_request(manual=True), metadata=keyed(uuid.uuid4().hex))
    payment_id = charged.payment.payment_id
    voided = await app.gateway.void(charged.payment.gateway_reference, uuid.uuid4().hex)
    assert voided.succeeded
    request, key = api.CapturePaymentRequest(payment_id=payment_id), uuid.uuid4().hex
    first = await rpc_error(bare.CapturePayment(request, metadata=keyed(key)))
    assert (first.code, first.info.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "GATEWAY_REJECTED",
    )
    await abandon_key(
        app, "CapturePayment", key, RecoveryPoint.OPERATION_CLAIMED, locked_at=_ago(LONG_AGO)
    )
    if answered_by == "recovery":
        assert (await app.recovery.run_once()).keys == 1
    answer = bare.CapturePayment(request, metadata=keyed(key))
    refused = await rpc_error(answer)
    assert (refused.code, refused.info.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "GATEWAY_REJECTED",
    ), refused.message
    assert await replayed_error(answer) == (answered_by == "recovery")
    again = bare.CapturePayment(request, metadata=keyed(key))
    assert (await rpc_error(again)).info.reason == "GATEWAY_REJECTED"
    assert await replayed_error(again)
    payment = await bare.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
    assert payment.payment.status == S.PAYMENT_STATUS_AUTHORIZED


async def test_two_replicas_answer_each_abandoned_key_once(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    replica_a = make_settings(database_url, tmp_path, instance_id="replica-a", **LOST_ANSWERS)
    replica_b = make_settings(database_url, tmp_path, instance_id="replica-b", **LOST_ANSWERS)
    async with serving(replica_a) as (app_a, stub_a), serving(replica_b) as (app_b, stub_b):
        keys = [uuid.uuid4().hex for _ in range(8)]
        charged = [
            await charge_with_lost_answer((stub_a, stub_b)[i % 2], k) for i, k in enumerate(keys)
        ]
        reports = await asyncio.gather(app_a.recovery.run_once(), app_b.recovery.run_once())
        assert sum(report.keys for report in reports) == len(keys)
        for key, (request, payment_id) in zip(keys, charged, strict=True):
            await assert_retry_replays_the_capture(app_a, stub_b, request, key, payment_id)


async def test_a_failing_item_neither_stops_the_pass_nor_the_reaper(app, bare) -> None:
    broken = await _charged_payment_id(bare)
    healthy = await _charged_payment_id(bare)
    # Listed oldest first: the broken refund comes first, then the healthy one.
    first = await insert_pending_refund(app, broken, 100, updated_at=_ago(timedelta(minutes=2)))
    second = await insert_pending_refund(app, healthy, 100, updated_at=_ago(timedelta(minutes=1)))
    await _lose_encryption_key_of(app, broken)
    await expire_idempotency_keys(app)
    report = await app.recovery.run_once()
    assert await refund_status(app, first) == "PENDING"
    assert await refund_status(app, second) == "SUCCEEDED"
    assert report.settled == 1
    assert await _stored_keys(app) == 0


async def _charged_payment_id(stub: Any) -> str:
    charged = await stub.Charge(charge_request(), metadata=keyed(uuid.uuid4().hex))
    return str(charged.payment.payment_id)


async def _lose_encryption_key_of(app: Application, payment_id: str) -> None:
    """The payment's metadata was encrypted under a key no longer configured: reading the
    payment fails (not a domain error; nothing the worker expects)."""
    async with app.engine.begin() as conn:
        await conn.execute(
            payments.update()
            .where(payments.c.id == payment_id)
            .values(metadata_json="enc:v1:retired:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        )


async def _stored_keys(app: Application) -> int:
    async with app.engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(idempotency_keys)
        return int((await conn.execute(query)).scalar_one())


def _ago(delta: timedelta) -> datetime:
    return datetime.now(UTC) - delta
