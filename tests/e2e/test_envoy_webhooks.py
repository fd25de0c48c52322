"""Stripe's webhooks through the Envoy edge (k8s/envoy/envoy.local.yaml, as `make gateway`
runs it): POST /v1/webhooks/stripe reaches the service's webhook listener with its body
byte for byte (no JSON-body copy, no transcoding), so a signed event is verified by the SDK
and applied, and a bad signature or a tampered body is 400 and changes nothing. GATEWAY=
stripe against the Stripe-compatible simulator, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from payment_grpc.adapters.gateways.stripe_webhooks_out import signature_header
from payment_grpc.bootstrap import Application
from tests.e2e.envoy import Gateway, envoy_gateway
from tests.helpers.builders import S
from tests.integration.test_stripe_webhooks import (
    SLOW_SETTLE_MS,
    intent_event,
    processing_upi,
    status_of,
)
from tests.stripe_sim import WEBHOOK_SECRET, payment_stub, running_simulator, stripe_service

PATH = "/v1/webhooks/stripe"


@pytest.fixture
async def app(database_url: str, tmp_path: pathlib.Path) -> AsyncIterator[Application]:
    async with (
        running_simulator(tmp_path, settle_ms=SLOW_SETTLE_MS) as sim,
        stripe_service(database_url, tmp_path, sim) as application,
    ):
        sim.simulator.webhooks.url = ""  # deliveries only from the test, through Envoy
        yield application


@pytest.fixture
async def gateway(app: Application, tmp_path: pathlib.Path) -> AsyncIterator[Gateway]:
    assert app.webhooks is not None
    async with envoy_gateway(app.port, tmp_path, [app.webhooks.port]) as running:
        yield running


@pytest.fixture
async def stub(app: Application) -> AsyncIterator[Any]:
    async with payment_stub(app) as stub:
        yield stub


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[bytes, dict[str, str]]:
    # Spaces after separators, as Stripe sends: a body re-encoded on the way (transcoding,
    # JSON normalization) would no longer match the signature.
    payload = json.dumps(event, indent=1).encode()
    headers = {
        "stripe-signature": signature_header(payload, secret),
        "content-type": "application/json; charset=utf-8",
    }
    return payload, headers


async def test_a_signed_webhook_through_envoy_settles_the_payment(
    stub: Any, gateway: Gateway
) -> None:
    payment = await processing_upi(stub)
    event = intent_event(
        "payment_intent.succeeded", payment.gateway_reference, payment.payment_id, "succeeded"
    )
    payload, headers = signed(event)
    reply = await gateway.request("POST", PATH, payload, headers)
    assert reply.status == 200, reply.body
    assert reply.json()["received"] is True
    assert await status_of(stub, payment.payment_id) == S.PAYMENT_STATUS_CAPTURED


@pytest.mark.parametrize("attack", ["wrong-secret", "tampered", "unsigned"])
async def test_a_bad_signature_through_envoy_is_400_and_changes_nothing(
    stub: Any, gateway: Gateway, attack: str
) -> None:
    payment = await processing_upi(stub)
    event = intent_event(
        "payment_intent.succeeded", payment.gateway_reference, payment.payment_id, "succeeded"
    )
    payload, headers = signed(event, "whsec_wrong" if attack == "wrong-secret" else WEBHOOK_SECRET)
    if attack == "tampered":
        payload = payload.replace(b'"amount": 50000', b'"amount": 5')
    if attack == "unsigned":
        del headers["stripe-signature"]
    reply = await gateway.request("POST", PATH, payload, headers)
    assert reply.status == 400, reply.body
    assert await status_of(stub, payment.payment_id) == S.PAYMENT_STATUS_PROCESSING


async def test_only_post_is_routed_to_the_webhook_listener(gateway: Gateway) -> None:
    """Any other method on the path falls to the transcoded API, which knows no such
    method (404); the webhook listener is never reached by it."""
    reply = await gateway.get(PATH)
    assert reply.status == 404, reply.body
