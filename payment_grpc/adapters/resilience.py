"""Retries and a circuit breaker for calls that leave the process: the order and auth
services' gRPC clients and a networked payment gateway. One piece, built from
well-kept libraries, parameterised by what each side calls transient (retried) and
what it calls a failure (counted by the breaker).

- Retries (tenacity): only transient errors, exponential backoff with jitter, a bounded
  number of attempts. With an incoming deadline (`service.context.call_deadline`), each
  attempt gets min(own timeout, what remains), no attempt starts after it has passed
  (DeadlinePassed) and no backoff ends after it.
- Circuit breaker (purgatory), one per collaborator: after `breaker_threshold`
  consecutive failures it opens and calls fail at once (nothing sent) for
  `breaker_reset_s`; then one trial call is let through and its success closes it.
  Errors that are not failures (a definite answer) count as successes.

Two compositions, each a side's behaviour:
- `Collaborator` (gRPC clients: reads and notifications): the breaker inside the
  retries, so every attempt counts and an open breaker ends the retries.
- `Breaker.call(lambda: retrying(...))` (the gateway, GuardedGateway): the breaker
  outside the retries, so a call counts once and an open breaker is only ever raised
  before anything was sent (never after an attempt whose outcome is unknown).
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

T = TypeVar("T")
ErrorTest = Callable[[BaseException], bool]
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class CircuitOpen(Exception):
    """The collaborator's breaker is open: nothing was sent."""


class DeadlinePassed(Exception):
    """The incoming call's deadline passed before an attempt could start."""


@dataclass(frozen=True, slots=True)
class CallPolicy:
    timeout_s: float | None = 1.0  # per attempt (None: only the adapter's own timeouts)
    attempts: int = 3
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0
    breaker_threshold: int = 5  # consecutive failures that open the breaker
    breaker_reset_s: float = 10.0  # open this long, then a half-open trial


class Breaker:
    """One collaborator's circuit breaker; `failure` says which errors count (the others
    are answers: they count as successes). While open, calls raise `open_error()`."""

    def __init__(
        self,
        name: str,
        policy: CallPolicy,
        *,
        failure: ErrorTest,
        open_error: Callable[[], Exception] | None = None,
    ) -> None:
        self.name = name
        self._reset_s = policy.breaker_reset_s
        self._open_error = open_error or (lambda: CircuitOpen(name))
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=policy.breaker_threshold,
            default_ttl=policy.breaker_reset_s,
            exclude=[(BaseException, lambda error: not failure(error))],
        )
        self.opened_at: float | None = None  # unix time it last opened; None: not open

    def available(self) -> bool:
        """False while the breaker is open and its wait has not run out."""
        return self.opened_at is None or time.time() > self.opened_at + self._reset_s

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        breaker = await self._breakers.get_breaker(self.name)
        try:
            async with breaker:
                return await attempt()
        except OpenedState as exc:
            raise self._open_error() from exc
        finally:
            context = breaker.context
            self.opened_at = context.opened_at if context.state == "opened" else None


async def retrying(
    attempt: Callable[[float | None], Awaitable[T]],
    policy: CallPolicy,
    *,
    transient: ErrorTest,
    deadline: float | None = None,
) -> T:
    """`attempt(timeout_s)` until it succeeds, raises a non-transient error, runs out of
    attempts, or the next backoff would end after `deadline` (time.monotonic())."""
    async for try_ in AsyncRetrying(
        retry=retry_if_exception(transient),
        stop=stop_after_attempt(policy.attempts) | _past(deadline),
        wait=wait_exponential_jitter(
            multiplier=policy.backoff_initial_s,
            jitter=policy.backoff_initial_s,
            max=policy.backoff_max_s,
        ),
        reraise=True,
    ):
        with try_:
            return await attempt(_timeout(policy.timeout_s, deadline))
    raise AssertionError("unreachable: tenacity reraises the last error")


def transient(error: BaseException) -> bool:
    """A gRPC collaborator's transient failure: UNAVAILABLE or DEADLINE_EXCEEDED."""
    return isinstance(error, aio.AioRpcError) and error.code() in RETRYABLE


class Collaborator:
    """Resilient gRPC calls to one collaborator (share one instance per collaborator):
    UNAVAILABLE and DEADLINE_EXCEEDED are transient and the only failures; the incoming
    call's deadline bounds every attempt; each attempt passes the breaker."""

    def __init__(self, name: str, policy: CallPolicy) -> None:
        self.name = name
        self.policy = policy
        self._breaker = Breaker(name, policy, failure=transient)

    async def call(self, attempt: Callable[[float | None], Awaitable[T]]) -> T:
        return await retrying(
            lambda timeout_s: self._breaker.call(lambda: attempt(timeout_s)),
            self.policy,
            transient=transient,
            deadline=call_deadline.get(),
        )


def _timeout(own_s: float | None, deadline: float | None) -> float | None:
    if deadline is None:
        return own_s
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlinePassed()
    return remaining if own_s is None else min(own_s, remaining)


class _past(stop_base):  # noqa: N801 - reads like tenacity's own stop conditions
    """Stop when the next backoff would end after the incoming call's deadline."""

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self._deadline is None:
            return False
        upcoming = retry_state.upcoming_sleep or 0.0
        return time.monotonic() + upcoming >= self._deadline
