"""`payment-grpc gateway-sim`: run the Stripe-compatible simulator as its own process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from payment_grpc.adapters.gateways.engine import SimulatedGatewayConfig, SimulatorEngine
from payment_grpc.adapters.gateways.failure_mix import FailureMix
from payment_grpc.adapters.gateways.stripe_simulator import StripeSimulator, start_simulator
from payment_grpc.adapters.gateways.stripe_webhooks_out import DeliveryPolicy, WebhookSender

log = logging.getLogger("payment_grpc.gateway_sim")
DEFAULT_KEY = "sk_test_simulator"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = commands.add_parser("gateway-sim", help="run the Stripe-compatible gateway simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=12111, help="0: any free port (printed)")
    sim.add_argument("--api-key", default=DEFAULT_KEY, help="the secret key callers must send")
    sim.add_argument("--webhook-url", default="", help="where to POST signed events")
    sim.add_argument("--webhook-secret", default="whsec_simulator")
    sim.add_argument("--latency-ms-min", type=int, default=0)
    sim.add_argument("--latency-ms-max", type=int, default=0)
    sim.add_argument("--success-rate", type=float, default=0.95)
    sim.add_argument(
        "--failure-mix",
        type=FailureMix.parse,
        default=FailureMix(),
        help="declined=60,insufficient_funds=10,network_error=20,invalid_method=10",
    )
    sim.add_argument("--async-settle-ms", type=int, default=2000)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--ledger", default="gateway-sim-ledger.db", help="SQLite file")
    sim.add_argument(
        "--chaos", action="store_true", help="duplicate and reorder webhook deliveries"
    )
    sim.add_argument("--webhook-retry-ms", type=int, default=500, help="first retry delay")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.success_rate <= 1:
        print("gateway-sim: --success-rate must be within 0..1", flush=True)
        return 2
    asyncio.run(_serve(args))
    return 0


async def _serve(args: argparse.Namespace) -> None:
    config = SimulatedGatewayConfig.from_knobs(args.ledger, args)
    engine = SimulatorEngine(config, reference_prefix="pi_sim")
    policy = DeliveryPolicy(first_retry_s=args.webhook_retry_ms / 1000, chaos=args.chaos)
    webhooks = WebhookSender(args.webhook_url, args.webhook_secret, policy, args.seed)
    running = await start_simulator(
        StripeSimulator(engine, args.api_key, webhooks), args.host, args.port
    )
    print(f"gateway-sim listening on http://{args.host}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
