"""How every outbound gRPC call to a collaborator behaves (order service, auth service, and
any gateway that wants it): one place, built from well-kept libraries.

- Deadline: each attempt gets min(own timeout, what remains of the incoming call's
  deadline) (`service.context.call_deadline`); no attempt starts after it has passed.
- Retries (tenacity): only UNAVAILABLE and DEADLINE_EXCEEDED, exponential backoff with
  jitter, a bounded number of attempts, and never a sleep that outlives the deadline.
- Circuit breaker (purgatory), one per collaborator: after `breaker_threshold` consecutive
  transient failures it opens and calls fail at once with CircuitOpen for
  `breaker_reset_s`; then one probe is let through and its success closes it. Definite
  answers (NOT_FOUND, PERMISSION_DENIED, ...) are not failures of the collaborator.

Callers map the outcome at their edge: AioRpcError (a definite answer, or the last
transient failure) and CircuitOpen.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc import aio
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from payment_grpc.service.context import call_deadline

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
Reply = TypeVar("Reply")


class CircuitOpen(Exception):
    """The collaborator's breaker is open: nothing was sent."""


class DeadlinePassed(Exception):
    """The incoming call's deadline passed before an attempt could start."""


@dataclass(frozen=True, slots=True)
class CallPolicy:
    timeout_s: float = 1.0  # per attempt, before the incoming deadline cuts it
    attempts: int = 3
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0
    breaker_threshold: int = 5  # consecutive transient failures that open the breaker
    breaker_reset_s: float = 10.0  # open this long, then a half-open probe


def transient(error: BaseException) -> bool:
    return isinstance(error, aio.AioRpcError) and error.code() in RETRYABLE


def _definite_answer(error: BaseException) -> bool:
    """Not a failure of the collaborator: it answered (or we stopped waiting ourselves)."""
    return not transient(error)


class Collaborator:
    """Resilient calls to one collaborator; share one instance per collaborator."""

    def __init__(self, name: str, policy: CallPolicy) -> None:
        self.name = name
        self.policy = policy
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=policy.breaker_threshold,
            default_ttl=policy.breaker_reset_s,
            exclude=[(BaseException, _definite_answer)],
        )

    async def call(self, attempt: Callable[[float], Awaitable[Reply]]) -> Reply:
        """Run `attempt(timeout_s)` with retries, breaker and deadline (see the module doc)."""
        deadline = call_deadline.get()
        retrying = AsyncRetrying(
            retry=retry_if_exception(transient),
            stop=stop_after_attempt(self.policy.attempts) | _past(deadline),
            wait=wait_exponential_jitter(
                multiplier=self.policy.backoff_initial_s,
                jitter=self.policy.backoff_initial_s,
                max=self.policy.backoff_max_s,
            ),
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                return await self._once(attempt, _timeout(self.policy.timeout_s, deadline))
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _once(self, attempt: Callable[[float], Awaitable[Reply]], timeout_s: float) -> Reply:
        try:
            breaker = await self._breakers.get_breaker(self.name)
            async with breaker:
                return await attempt(timeout_s)
        except OpenedState as exc:
            raise CircuitOpen(self.name) from exc


def _timeout(own_s: float, deadline: float | None) -> float:
    if deadline is None:
        return own_s
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlinePassed()
    return min(own_s, remaining)


class _past(stop_base):  # noqa: N801 - reads like tenacity's own stop conditions
    """Stop when the next backoff would end after the incoming call's deadline."""

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self._deadline is None:
            return False
        upcoming = retry_state.upcoming_sleep or 0.0
        return time.monotonic() + upcoming >= self._deadline
