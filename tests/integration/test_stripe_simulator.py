"""The Stripe-compatible simulator as Stripe's clients see it: idempotency semantics,
the error envelope, and signed webhooks retried until acknowledged."""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web

from payment_grpc.adapters.gateways.stripe_simulator import RunningSimulator
from tests.stripe_sim import API_KEY, WEBHOOK_SECRET, running_simulator

INTENT = {
    "amount": 1_000,
    "currency": "usd",
    "payment_method": "pm_card_visa",
    "confirm": True,
    "metadata": {"payment_id": "pay_sim_test"},
}


class Receiver:
    """A webhook endpoint that refuses the first `refusals` deliveries, then verifies
    each one with the Stripe SDK and queues the event."""

    def __init__(self, refusals: int = 0) -> None:
        self.refusals = refusals
        self.attempts = 0
        self.events: asyncio.Queue[Any] = asyncio.Queue()

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.refusals:
            return web.Response(status=503)
        payload = await request.read()
        event = stripe.Webhook.construct_event(
            payload, request.headers["Stripe-Signature"], WEBHOOK_SECRET, tolerance=300
        )
        await self.events.put(event)
        return web.json_response({"received": True})


@pytest.fixture
async def receiver_url() -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver(refusals=2)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield receiver, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


def client(sim: RunningSimulator) -> stripe.StripeClient:
    return stripe.StripeClient(
        API_KEY,
        base_addresses={"api": sim.base_url},
        http_client=stripe.HTTPXClient(allow_sync_methods=False),
        max_network_retries=0,
    )


async def test_idempotency_key_with_other_parameters_is_refused(tmp_path: pathlib.Path) -> None:
    async with running_simulator(tmp_path) as sim:
        stripe_client = client(sim)
        key = {"idempotency_key": uuid.uuid4().hex}
        first = await stripe_client.v1.payment_intents.create_async(params=INTENT, options=key)
        again = await stripe_client.v1.payment_intents.create_async(params=INTENT, options=key)
        assert again.id == first.id
        assert again.last_response.headers.get("Idempotent-Replayed") == "true"
        with pytest.raises(stripe.IdempotencyError):
            await stripe_client.v1.payment_intents.create_async(
                params={**INTENT, "amount": 999}, options=key
            )
        assert len(await sim.simulator_engine.charges_of_payment("pay_sim_test")) == 1


async def test_errors_come_in_stripes_envelope(tmp_path: pathlib.Path) -> None:
    async with running_simulator(tmp_path) as sim:
        with pytest.raises(stripe.InvalidRequestError) as missing:
            await client(sim).v1.payment_intents.retrieve_async("pi_nowhere")
        assert missing.value.code == "resource_missing"
        assert missing.value.http_status == 404
        with pytest.raises(stripe.InvalidRequestError) as invalid:
            await client(sim).v1.payment_intents.create_async(params={"currency": "usd"})
        assert invalid.value.param == "amount"


async def test_webhooks_are_signed_and_retried_until_acknowledged(
    tmp_path: pathlib.Path, receiver_url: tuple[Receiver, str]
) -> None:
    receiver, url = receiver_url
    async with running_simulator(tmp_path, webhook_url=url) as sim:
        upi = {
            "amount": 5_000,
            "currency": "inr",
            "confirm": True,
            "payment_method_data": {"type": "upi", "upi": {"vpa": "payer@upi"}},
            "metadata": {"payment_id": "pay_upi_hook"},
        }
        intent = await client(sim).v1.payment_intents.create_async(params=upi)
        assert intent.status == "processing"
        seen: dict[str, str] = {}
        while "payment_intent.succeeded" not in seen:
            event = await asyncio.wait_for(receiver.events.get(), timeout=10)
            seen[event.type] = event.data.object.id
        assert seen["payment_intent.succeeded"] == intent.id
        assert receiver.attempts > 2  # the two refusals were retried


async def test_a_wrong_secret_does_not_verify(tmp_path: pathlib.Path) -> None:
    from payment_grpc.adapters.gateways.stripe_webhooks_out import signature_header

    payload = b'{"id": "evt_1", "object": "event"}'
    header = signature_header(payload, "whsec_other")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, header, WEBHOOK_SECRET)


async def test_faults_queued_over_http_apply_to_the_next_requests_until_cleared(
    tmp_path: pathlib.Path,
) -> None:
    async with running_simulator(tmp_path) as sim, aiohttp.ClientSession() as session:
        hook = f"{sim.base_url}/_sim/faults"
        async with session.post(hook, data={"faults": "server_error,rate_limit,rate_limit"}):
            pass
        with pytest.raises(stripe.APIError):
            await client(sim).v1.payment_intents.create_async(params=INTENT)
        async with session.post(hook, data={"clear": "1"}) as reply:
            assert await reply.json() == {"queued": [], "cleared": 2}
        created = await client(sim).v1.payment_intents.create_async(params=INTENT)
        assert created.status == "succeeded"
