"""The in-process simulated gateway: the embedded default (`GATEWAY=simulated`).

A thin face over the simulator engine (`engine.py`), which the Stripe-compatible HTTP
simulator shares: same decisions, same ledger. UPI, net banking and PayPal settle later:
their outcome is delivered to the GatewayNews port (the HTTP simulator sends webhooks).
The ledger's own errors are mapped to the GatewayError family inside the engine.
"""

from __future__ import annotations

import logging

from payment_grpc.adapters.gateways.engine import SimulatedGatewayConfig, SimulatorEngine
from payment_grpc.adapters.gateways.failure_mix import FailureMix
from payment_grpc.domain.money import Money
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationRequest,
    GatewayNews,
    GatewayResult,
    Settlement,
)

__all__ = ["FailureMix", "SimulatedGateway", "SimulatedGatewayConfig"]
log = logging.getLogger(__name__)


class SimulatedGateway:
    def __init__(self, config: SimulatedGatewayConfig, news: GatewayNews | None = None) -> None:
        self.engine = SimulatorEngine(config)
        self._news = news
        self.engine.on_settled(self._settled)

    async def _settled(self, payment_id: str, _key: str, authorization: Authorization) -> None:
        if self._news is not None:
            await self._news.settled(Settlement(payment_id, authorization))

    async def authorize(self, request: AuthorizationRequest) -> Authorization:
        return await self.engine.authorize(request)

    async def lookup(self, idempotency_key: str) -> Authorization | None:
        return await self.engine.lookup(idempotency_key)

    async def capture(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return await self.engine.capture(reference, amount, idempotency_key)

    async def void(self, reference: str, idempotency_key: str) -> GatewayResult:
        return await self.engine.void(reference, idempotency_key)

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return await self.engine.refund(reference, amount, idempotency_key)

    def available(self) -> bool:
        return True  # no breaker: the in-process simulator cannot be cut off

    async def start(self) -> None:
        """Nothing to start: the ledger opens on first use."""

    async def healthy(self) -> bool:
        return await self.engine.healthy()

    async def close(self) -> None:
        await self.engine.close()

    async def authorization_count(self) -> int:
        return await self.engine.authorization_count()
