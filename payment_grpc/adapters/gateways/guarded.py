"""Retries and a circuit breaker around a real (networked) gateway adapter, from the
shared resilience piece (adapters/resilience.py).

- Retries (tenacity, exponential backoff with jitter) only for transient failures
  (GatewayUnreachable: nothing happened; GatewayTimeout: unknown outcome) and only because every
  port call carries an idempotency key: the PSP answers a repeat with the first result.
- A breaker (purgatory) opens after `breaker_threshold` consecutive failed calls (each
  counted once, after its retries: an open breaker never hides the unknown outcome of an
  attempt already made); while open, calls fail at once with GatewayCircuitOpen (nothing
  sent) and `available()` is False, so Charge answers UNAVAILABLE GATEWAY_UNAVAILABLE with
  RetryInfo before creating anything. After `breaker_reset_s` one trial call goes through
  (half-open): success closes the breaker, a failure opens it again.
Declines and refusals are answers (results), not errors: they never count.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from payment_grpc.adapters.gateways.stripe.client import StripeGateway
from payment_grpc.adapters.resilience import Breaker, CallPolicy, retrying
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


def transient(error: BaseException) -> bool:
    return isinstance(error, GatewayUnreachable | GatewayTimeout)


def any_error(error: BaseException) -> bool:
    return True  # every error the call ends with, after its retries, counts


def _circuit_open() -> GatewayCircuitOpen:
    return GatewayCircuitOpen("the gateway circuit is open")


class GuardedGateway:
    """`policy.timeout_s` is not used: the inner adapter has its own timeouts."""

    def __init__(self, inner: StripeGateway, policy: CallPolicy) -> None:
        self.inner = inner
        self._policy = policy
        self._breaker = Breaker(CIRCUIT, policy, failure=any_error, open_error=_circuit_open)

    @property
    def opened_at(self) -> float | None:
        """When the breaker last opened (unix time), or None while it is closed."""
        return self._breaker.opened_at

    def available(self) -> bool:
        """False while the breaker is open and its wait has not run out."""
        return self._breaker.available()

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        return await self._breaker.call(
            lambda: retrying(lambda _timeout: call(), self._policy, transient=transient)
        )

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
