"""Retries and a circuit breaker around a real (networked) gateway adapter.

- Retries (tenacity, exponential backoff with jitter) only for transient failures
  (GatewayUnreachable: nothing happened; GatewayTimeout: unknown outcome) and only because every
  port call carries an idempotency key: the PSP answers a repeat with the first result.
- A breaker (purgatory) opens after `failures` consecutive transient failures; while open,
  calls fail at once with GatewayCircuitOpen (nothing sent) and `available()` is False, so
  Charge answers UNAVAILABLE GATEWAY_UNAVAILABLE with RetryInfo before creating anything.
  After `open_seconds` one trial call goes through (half-open): success closes the breaker,
  a failure opens it again.
Declines and refusals are answers, not failures: they never count.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from payment_grpc.adapters.gateways.stripe.client import StripeGateway
from payment_grpc.domain.money import Money
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationRequest,
    GatewayCircuitOpen,
    GatewayResult,
    GatewayTimeout,
    GatewayUnreachable,
)

T = TypeVar("T")
CIRCUIT = "gateway"
TRANSIENT = (GatewayUnreachable, GatewayTimeout)


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    attempts: int = 3
    first_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    failures: int = 5
    open_seconds: float = 30.0


class GuardedGateway:
    def __init__(self, inner: StripeGateway, policy: GuardPolicy) -> None:
        self.inner = inner
        self._policy = policy
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=policy.failures, default_ttl=policy.open_seconds
        )
        self._opened_at: float | None = None

    @property
    def opened_at(self) -> float | None:
        """When the breaker last opened (unix time), or None while it is closed."""
        return self._opened_at

    def available(self) -> bool:
        """False while the breaker is open and its wait has not run out."""
        if self._opened_at is None:
            return True
        return time.time() > self._opened_at + self._policy.open_seconds

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        breaker = await self._breakers.get_breaker(CIRCUIT)
        try:
            async with breaker:
                result = await self._retrying(call)
        except OpenedState as exc:
            self._opened_at = exc.opened_at
            raise GatewayCircuitOpen("the gateway circuit is open") from exc
        finally:
            state = breaker.context.state
            self._opened_at = breaker.context.opened_at if state == "opened" else None
        return result

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        policy = self._policy
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_exponential_jitter(
                multiplier=policy.first_backoff_s,
                max=policy.max_backoff_s,
                jitter=policy.first_backoff_s,
            ),
            retry=retry_if_exception_type(TRANSIENT),
            reraise=True,
        ):
            with attempt:
                return await call()
        raise AssertionError("tenacity either returns or reraises")

    # ---------------------------------------------------------------- the port

    async def authorize(self, request: AuthorizationRequest) -> Authorization:
        return await self._guarded(lambda: self.inner.authorize(request))

    async def lookup(self, idempotency_key: str) -> Authorization | None:
        return await self._guarded(lambda: self.inner.lookup(idempotency_key))

    async def capture(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return await self._guarded(lambda: self.inner.capture(reference, amount, idempotency_key))

    async def void(self, reference: str, idempotency_key: str) -> GatewayResult:
        return await self._guarded(lambda: self.inner.void(reference, idempotency_key))

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return await self._guarded(lambda: self.inner.refund(reference, amount, idempotency_key))

    async def start(self) -> None:
        await self.inner.start()

    async def healthy(self) -> bool:
        return self.available() and await self.inner.healthy()

    async def close(self) -> None:
        await self.inner.close()
