"""The Stripe-compatible simulator on port 0, for tests (a real HTTP server)."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

from grpc import aio
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.adapters.gateways.engine import SimulatedGatewayConfig, SimulatorEngine
from payment_grpc.adapters.gateways.stripe.client import StripeConfig, StripeGateway
from payment_grpc.adapters.gateways.stripe_simulator import (
    RunningSimulator,
    StripeSimulator,
    start_simulator,
)
from payment_grpc.adapters.gateways.stripe_webhooks_out import DeliveryPolicy, WebhookSender
from payment_grpc.bootstrap import Application, build_application
from tests.conftest import make_settings
from tests.helpers.credentials import client_metadata

API_KEY = "sk_test_simulator"
WEBHOOK_SECRET = "whsec_test_simulator"


@contextlib.asynccontextmanager
async def running_simulator(
    tmp_path: pathlib.Path,
    *,
    webhook_url: str = "",
    chaos: bool = False,
    settle_ms: int = 1_000,  # long enough that a loaded machine still sees PROCESSING first
    success_rate: float = 1.0,
    seed: int = 7,
) -> AsyncIterator[RunningSimulator]:
    engine = SimulatorEngine(
        SimulatedGatewayConfig(
            str(tmp_path / "stripe-sim-ledger.db"),
            success_rate=success_rate,
            async_settle_ms=settle_ms,
            seed=seed,
        ),
        reference_prefix="pi_sim",
    )
    policy = DeliveryPolicy(first_retry_s=0.02, max_retry_s=0.2, chaos=chaos)
    webhooks = WebhookSender(webhook_url, WEBHOOK_SECRET, policy, seed)
    running = await start_simulator(StripeSimulator(engine, API_KEY, webhooks))
    try:
        yield running
    finally:
        await running.stop()


def stripe_gateway(base_url: str, api_key: str = API_KEY, timeout_s: float = 5.0) -> StripeGateway:
    return StripeGateway(StripeConfig(api_key=api_key, api_base=base_url, timeout_s=timeout_s))


@contextlib.asynccontextmanager
async def stripe_service(
    database_url: str, tmp_path: pathlib.Path, sim: RunningSimulator, **overrides: object
) -> AsyncIterator[Application]:
    """The service with GATEWAY=stripe against the simulator; its webhook listener on a
    free port, and the simulator's webhooks pointed at it."""
    settings = make_settings(
        database_url,
        tmp_path,
        gateway="stripe",
        stripe_api_key=API_KEY,
        stripe_api_base=sim.base_url,
        stripe_webhook_secret=WEBHOOK_SECRET,
        webhook_port=0,
        **overrides,
    )
    application = build_application(settings)
    await application.start()
    assert application.webhooks is not None
    sim.simulator.webhooks.url = webhook_url(application)
    try:
        yield application
    finally:
        await application.stop()


def webhook_url(application: Application) -> str:
    assert application.webhooks is not None
    return f"http://127.0.0.1:{application.webhooks.port}/v1/webhooks/stripe"


@contextlib.asynccontextmanager
async def payment_stub(
    application: Application,
) -> AsyncIterator[payment_service_pb2_grpc.PaymentServiceStub]:
    address = f"127.0.0.1:{application.port}"
    async with aio.insecure_channel(address, interceptors=client_metadata()) as channel:
        yield payment_service_pb2_grpc.PaymentServiceStub(channel)
