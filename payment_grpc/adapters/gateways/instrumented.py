"""Any PaymentGateway, measured: payments.gateway.duration by operation and outcome."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from payment_grpc.domain.money import Money
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationRequest,
    GatewayRefused,
    GatewayResult,
    GatewayTimeout,
    GatewayUnreachable,
    PaymentGateway,
)
from payment_grpc.telemetry.metrics import GATEWAY_DURATION

Answer = TypeVar("Answer")


def _outcome(answer: object) -> str:
    if isinstance(answer, Authorization):
        return answer.outcome.value.lower()  # authorized, captured, declined, pending
    if isinstance(answer, GatewayResult):
        return "succeeded" if answer.succeeded else "refused"
    return "not_found" if answer is None else "found"


def _failure(error: Exception) -> str:
    if isinstance(error, GatewayTimeout):
        return "timeout"  # the outcome is unknown: recovery asks again
    if isinstance(error, GatewayUnreachable):
        return "unavailable"
    if isinstance(error, GatewayRefused):
        return "refused"
    return "error"


class InstrumentedGateway:
    """Wraps the gateway the use cases call; the composition root still starts and
    closes the wrapped adapter itself."""

    def __init__(self, gateway: PaymentGateway) -> None:
        self._gateway = gateway

    async def _measured(self, operation: str, call: Callable[[], Awaitable[Answer]]) -> Answer:
        started = time.perf_counter()
        outcome = "error"
        try:
            answer = await call()
            outcome = _outcome(answer)
            return answer
        except Exception as error:
            outcome = _failure(error)
            raise
        finally:
            GATEWAY_DURATION.record(
                (time.perf_counter() - started) * 1000,
                {"payments.gateway.operation": operation, "payments.gateway.outcome": outcome},
            )

    async def authorize(self, request: AuthorizationRequest) -> Authorization:
        return await self._measured("authorize", lambda: self._gateway.authorize(request))

    async def capture(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return await self._measured(
            "capture", lambda: self._gateway.capture(reference, amount, idempotency_key)
        )

    async def void(self, reference: str, idempotency_key: str) -> GatewayResult:
        return await self._measured("void", lambda: self._gateway.void(reference, idempotency_key))

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return await self._measured(
            "refund", lambda: self._gateway.refund(reference, amount, idempotency_key)
        )

    async def lookup(self, idempotency_key: str) -> Authorization | None:
        return await self._measured("lookup", lambda: self._gateway.lookup(idempotency_key))

    def available(self) -> bool:
        return self._gateway.available()

    async def healthy(self) -> bool:
        return await self._gateway.healthy()
