"""The Stripe adapter through the official SDK against the Stripe-compatible simulator
(a real HTTP server on port 0): every operation and every error class."""

from __future__ import annotations

import pathlib
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from payment_grpc.adapters.gateways.stripe.client import StripeGateway
from payment_grpc.adapters.gateways.stripe_simulator import RunningSimulator
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import PaymentMethod, PaymentMethodType
from payment_grpc.service.ports import (
    AuthorizationOutcome,
    AuthorizationRequest,
    GatewayTimeout,
    GatewayUnreachable,
)
from tests.stripe_sim import running_simulator, stripe_gateway

USD_10 = Money("USD", 1_000)


@pytest.fixture
async def sim(tmp_path: pathlib.Path) -> AsyncIterator[RunningSimulator]:
    async with running_simulator(tmp_path) as running:
        yield running


@pytest.fixture
async def gateway(sim: RunningSimulator) -> AsyncIterator[StripeGateway]:
    adapter = stripe_gateway(sim.base_url)
    try:
        yield adapter
    finally:
        await adapter.close()


def request(
    token: str = "tok_visa",
    *,
    capture: bool = True,
    kind: PaymentMethodType = PaymentMethodType.CARD,
    amount: Money = USD_10,
) -> AuthorizationRequest:
    payment_id = f"pay_{uuid.uuid4().hex}"
    return AuthorizationRequest(
        idempotency_key=f"{payment_id}:authorize",
        payment_id=payment_id,
        amount=amount,
        method=PaymentMethod(kind, token),
        capture=capture,
    )


async def test_automatic_capture_returns_the_card(gateway: StripeGateway) -> None:
    authorization = await gateway.authorize(request("tok_mastercard"))
    assert authorization.outcome is AuthorizationOutcome.CAPTURED
    assert authorization.reference.startswith("pi_sim_")
    assert authorization.card is not None
    assert (authorization.card.brand, authorization.card.last4) == ("mastercard", "4444")
    assert authorization.card.fingerprint


async def test_manual_capture_partial_then_several_partial_refunds(gateway: StripeGateway) -> None:
    authorized = await gateway.authorize(request(capture=False))
    assert authorized.outcome is AuthorizationOutcome.AUTHORIZED
    captured = await gateway.capture(authorized.reference, Money("USD", 600), "cap-1")
    assert captured.succeeded
    first = await gateway.refund(authorized.reference, Money("USD", 200), "ref-1")
    second = await gateway.refund(authorized.reference, Money("USD", 400), "ref-2")
    assert first.succeeded
    assert second.succeeded
    assert first.reference.startswith("re_sim_")
    assert first.reference != second.reference
    over = await gateway.refund(authorized.reference, Money("USD", 1), "ref-3")
    assert not over.succeeded
    assert over.failure is not None
    assert over.failure.code == "charge_already_refunded"


async def test_the_same_key_moves_money_once(gateway: StripeGateway) -> None:
    charge = request()
    first = await gateway.authorize(charge)
    again = await gateway.authorize(charge)
    assert first.reference == again.reference
    refund = await gateway.refund(first.reference, Money("USD", 300), "ref-once")
    repeated = await gateway.refund(first.reference, Money("USD", 300), "ref-once")
    assert repeated.reference == refund.reference
    rest = await gateway.refund(first.reference, Money("USD", 700), "ref-rest")
    assert rest.succeeded  # 300 + 700: the repeated 300 was not taken twice


async def test_cancel_and_capture_after_cancel_is_refused(gateway: StripeGateway) -> None:
    authorized = await gateway.authorize(request(capture=False))
    assert (await gateway.void(authorized.reference, "void-1")).succeeded
    refused = await gateway.capture(authorized.reference, USD_10, "cap-late")
    assert not refused.succeeded
    assert refused.failure is not None
    assert refused.failure.code == "payment_intent_unexpected_state"


@pytest.mark.parametrize(
    ("token", "code", "decline_code"),
    [
        ("tok_chargeDeclined", "card_declined", "generic_decline"),
        ("tok_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds"),
        ("tok_chargeDeclinedExpiredCard", "expired_card", "expired_card"),
    ],
)
async def test_card_errors_are_declines_with_decline_code(
    gateway: StripeGateway, token: str, code: str, decline_code: str
) -> None:
    authorization = await gateway.authorize(request(token))
    assert authorization.outcome is AuthorizationOutcome.DECLINED
    assert authorization.failure is not None
    assert (authorization.failure.code, authorization.failure.decline_code) == (code, decline_code)
    assert authorization.reference.startswith("pi_sim_")


async def test_invalid_request_is_permanent(gateway: StripeGateway) -> None:
    missing = await gateway.capture("pi_sim_unknown", USD_10, "cap-unknown")
    assert not missing.succeeded
    assert missing.failure is not None
    assert missing.failure.code == "resource_missing"


async def test_asynchronous_method_is_pending_then_found_by_lookup(
    gateway: StripeGateway, sim: RunningSimulator
) -> None:
    upi = request("payer@upi", kind=PaymentMethodType.UPI, amount=Money("INR", 50_000))
    pending = await gateway.authorize(upi)
    assert pending.outcome is AuthorizationOutcome.PENDING
    found = await gateway.lookup(upi.idempotency_key)
    assert found is not None
    assert found.reference == pending.reference
    assert await gateway.lookup(f"pay_{uuid.uuid4().hex}:authorize") is None


async def test_cash_on_delivery_never_reaches_stripe(gateway: StripeGateway) -> None:
    cod = request(kind=PaymentMethodType.COD, capture=False)
    authorized = await gateway.authorize(cod)
    assert authorized.outcome is AuthorizationOutcome.AUTHORIZED
    assert (await gateway.capture(authorized.reference, USD_10, "cod-cap")).succeeded


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("rate_limit", GatewayUnreachable),  # 429: not processed, safe to retry
        ("server_error", GatewayTimeout),  # 5xx: outcome unknown
        ("disconnect_after", GatewayTimeout),  # processed, answer lost
    ],
)
async def test_transient_errors(
    gateway: StripeGateway, sim: RunningSimulator, fault: str, error: type[Exception]
) -> None:
    charge = request()
    sim.simulator.faults.add([fault])
    with pytest.raises(error):
        await gateway.authorize(charge)
    retried = await gateway.authorize(charge)  # the same key: charged once in all cases
    assert retried.outcome is AuthorizationOutcome.CAPTURED
    assert len(await sim.simulator_engine.charges_of_payment(charge.payment_id)) == 1


async def test_a_lost_answer_is_replayed_not_recharged(
    gateway: StripeGateway, sim: RunningSimulator
) -> None:
    authorized = await gateway.authorize(request(capture=False))
    sim.simulator.faults.add(["disconnect_after"])
    with pytest.raises(GatewayTimeout):
        await gateway.capture(authorized.reference, USD_10, "cap-lost")
    assert (await gateway.capture(authorized.reference, USD_10, "cap-lost")).succeeded


async def test_timeout_is_unknown_outcome(sim: RunningSimulator) -> None:
    impatient = stripe_gateway(sim.base_url, timeout_s=0.2)
    try:
        sim.simulator.faults.add(["slow:2000"])
        with pytest.raises(GatewayTimeout):
            await impatient.authorize(request())
    finally:
        await impatient.close()


async def test_authentication_error_is_unavailable_and_logged(
    sim: RunningSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = stripe_gateway(sim.base_url, api_key="sk_test_wrong")
    try:
        with pytest.raises(GatewayUnreachable):
            await wrong.authorize(request())
    finally:
        await wrong.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("STRIPE_API_KEY" in message for message in errors)


async def test_permission_error_is_unavailable_and_logged(
    sim: RunningSimulator, gateway: StripeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A restricted key lacking a permission (HTTP 403) is our misconfiguration, like a
    wrong key: retryable for the caller, an ERROR for the operator, never a decline."""
    sim.simulator.faults.add(["permission_denied"])
    with pytest.raises(GatewayUnreachable):
        await gateway.authorize(request())
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("STRIPE_API_KEY" in message for message in errors)


async def test_unreachable_gateway_is_down() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connection refused
        nowhere = stripe_gateway(f"http://127.0.0.1:{port}")
        try:
            with pytest.raises(GatewayUnreachable):
                await nowhere.authorize(request())
        finally:
            await nowhere.close()


async def test_health_calls_the_api(gateway: StripeGateway) -> None:
    assert await gateway.healthy()
