"""Stripe webhooks in, end to end: the simulator (or the test, signing by hand) POSTs to the
service's listener; the SDK verifies; each event id is applied once, never backwards."""

from __future__ import annotations

import json
import pathlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.gateways.stripe_simulator import RunningSimulator
from payment_grpc.adapters.gateways.stripe_webhooks_out import signature_header
from payment_grpc.bootstrap import Application
from tests.helpers.builders import S, charge_request
from tests.helpers.db import events_of
from tests.stripe_sim import (
    WEBHOOK_SECRET,
    payment_stub,
    running_simulator,
    stripe_service,
    webhook_url,
)

SLOW_SETTLE_MS = 600_000  # the simulator stays quiet: the test sends the events itself


def upi() -> pb.PaymentMethod:
    return pb.PaymentMethod(upi=pb.UpiMethod(vpa="payer@okbank"))


@pytest.fixture
async def quiet_sim(tmp_path: pathlib.Path) -> AsyncIterator[RunningSimulator]:
    async with running_simulator(tmp_path, settle_ms=SLOW_SETTLE_MS) as running:
        yield running


@pytest.fixture
async def app(
    database_url: str, tmp_path: pathlib.Path, quiet_sim: RunningSimulator
) -> AsyncIterator[Application]:
    async with stripe_service(database_url, tmp_path, quiet_sim) as application:
        quiet_sim.simulator.webhooks.url = ""  # deliveries only from the test
        yield application


@pytest.fixture
async def stub(app: Application) -> AsyncIterator[Any]:
    async with payment_stub(app) as stub:
        yield stub


def intent_event(kind: str, reference: str, payment_id: str, status: str) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": kind,
        "created": int(time.time()),
        "data": {
            "object": {
                "id": reference,
                "object": "payment_intent",
                "amount": 50_000,
                "currency": "inr",
                "status": status,
                "metadata": {"payment_id": payment_id},
                "last_payment_error": None,
                "latest_charge": None,
            }
        },
    }


async def post(
    app: Application,
    event: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    at: int | None = None,
    tamper: bool = False,
) -> tuple[int, dict[str, Any]]:
    payload = json.dumps(event).encode()
    header = signature_header(payload, secret, at)
    if tamper:
        payload = payload.replace(b"succeeded", b"canceled")
    headers = {"Stripe-Signature": header, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(webhook_url(app), data=payload, headers=headers) as reply,
    ):
        return reply.status, await reply.json()


async def processing_upi(stub: Any) -> Any:
    payment = (await stub.Charge(charge_request(50_000, upi(), currency="INR"))).payment
    assert payment.status == S.PAYMENT_STATUS_PROCESSING
    return payment


async def status_of(stub: Any, payment_id: str) -> int:
    reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
    return int(reply.payment.status)


@pytest.mark.parametrize(
    "attack",
    [
        {"secret": "whsec_wrong"},
        {"at": int(time.time()) - 301},  # older than the 300 s tolerance
        {"tamper": True},
    ],
    ids=["wrong-secret", "stale", "tampered"],
)
async def test_unverifiable_events_are_refused_and_change_nothing(
    app: Application, stub: Any, attack: dict[str, Any]
) -> None:
    payment = await processing_upi(stub)
    before = await events_of(app, payment.payment_id)
    event = intent_event(
        "payment_intent.succeeded", payment.gateway_reference, payment.payment_id, "succeeded"
    )
    status, _ = await post(app, event, **attack)
    assert status == 400
    assert await events_of(app, payment.payment_id) == before
    assert await status_of(stub, payment.payment_id) == S.PAYMENT_STATUS_PROCESSING


async def test_valid_replayed_and_out_of_order_events(app: Application, stub: Any) -> None:
    payment = await processing_upi(stub)
    succeeded = intent_event(
        "payment_intent.succeeded", payment.gateway_reference, payment.payment_id, "succeeded"
    )
    assert await post(app, succeeded) == (200, {"received": True, "outcome": "applied"})
    assert await status_of(stub, payment.payment_id) == S.PAYMENT_STATUS_CAPTURED
    after = await events_of(app, payment.payment_id)
    assert after[-1][1:] == ("PROCESSING", "CAPTURED")

    assert await post(app, succeeded) == (200, {"received": True, "outcome": "duplicate"})
    late = intent_event(
        "payment_intent.processing", payment.gateway_reference, payment.payment_id, "processing"
    )
    failed = intent_event(
        "payment_intent.payment_failed",
        payment.gateway_reference,
        payment.payment_id,
        "requires_payment_method",
    )
    for backwards in (late, failed):
        status, _ = await post(app, backwards)
        assert status == 200
    assert await events_of(app, payment.payment_id) == after  # nothing moved backwards


@pytest.mark.parametrize(
    "error",
    [
        {"type": "card_error", "code": "card_declined", "decline_code": "do_not_honor"},
        {"type": "invalid_request_error", "code": "payment_method_invalid"},  # no decline_code
        {"type": "api_error"},  # neither code nor message
    ],
    ids=["declined", "no-decline-code", "bare"],
)
async def test_a_failed_payment_event_fails_the_payment_whatever_its_error_names(
    app: Application, stub: Any, error: dict[str, Any]
) -> None:
    """Stripe leaves out the fields of last_payment_error that do not apply; a failure
    without a decline_code (an invalid UPI address) must fail the payment, not stay
    PROCESSING with the event answered 500 forever."""
    payment = await processing_upi(stub)
    failed = intent_event(
        "payment_intent.payment_failed",
        payment.gateway_reference,
        payment.payment_id,
        "requires_payment_method",
    )
    failed["data"]["object"]["last_payment_error"] = {"message": "refused", **error}
    assert await post(app, failed) == (200, {"received": True, "outcome": "applied"})
    reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment.payment_id))
    assert reply.payment.status == S.PAYMENT_STATUS_FAILED
    assert reply.payment.failure.code == error.get("code", "payment_failed")
    assert reply.payment.failure.decline_code == error.get("decline_code", "")


async def test_unknown_payment_is_acknowledged(app: Application) -> None:
    event = intent_event("payment_intent.succeeded", "pi_elsewhere", "pay_unknown", "succeeded")
    assert await post(app, event) == (200, {"received": True, "outcome": "unknown payment"})


async def test_dispute_is_recorded_without_moving_money(app: Application, stub: Any) -> None:
    payment = (await stub.Charge(charge_request(7_000))).payment
    before = await events_of(app, payment.payment_id)
    dispute = {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": "charge.dispute.created",
        "created": int(time.time()),
        "data": {
            "object": {
                "id": "dp_test_1",
                "object": "dispute",
                "amount": 7_000,
                "currency": "usd",
                "payment_intent": payment.gateway_reference,
                "reason": "fraudulent",
                "status": "needs_response",
            }
        },
    }
    assert await post(app, dispute) == (200, {"received": True, "outcome": "dispute recorded"})
    assert await post(app, dispute) == (200, {"received": True, "outcome": "duplicate"})
    after = await events_of(app, payment.payment_id)
    assert after == [*before, (before[-1][0] + 1, "CAPTURED", "CAPTURED")]
    reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment.payment_id))
    assert reply.payment.captured_amount.amount_minor == 7_000
    assert reply.payment.refunded_amount.amount_minor == 0


async def test_async_upi_payment_is_captured_by_the_simulators_webhook(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """The simulator settles UPI later and announces it only by signed webhooks, with
    chaos (duplicates, random delays); a watcher sees PROCESSING -> CAPTURED once."""
    async with (
        running_simulator(tmp_path, chaos=True) as sim,
        stripe_service(database_url, tmp_path, sim) as app,
        payment_stub(app) as stub,
    ):
        payment = await processing_upi(stub)
        watch = stub.WatchPaymentStatus(
            api.WatchPaymentStatusRequest(payment_id=payment.payment_id)
        )
        statuses = [message.event.status async for message in watch]
        assert statuses[0] == S.PAYMENT_STATUS_PROCESSING
        assert statuses[-1] == S.PAYMENT_STATUS_CAPTURED
        transitions = [e[1:] for e in await events_of(app, payment.payment_id)]
        assert transitions.count(("PROCESSING", "CAPTURED")) == 1
