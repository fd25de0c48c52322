"""CachedVerifier: a verified token is checked once and remembered until its `exp`, never
longer, never past the size bound; refusals are never remembered."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from payment_grpc.adapters.auth.jwt_verifier import JwtVerifier
from payment_grpc.adapters.auth.verified_cache import CachedVerifier
from payment_grpc.service.errors import Unauthenticated
from payment_grpc.service.ports import Principal
from tests.helpers.clock import SettableClock
from tests.helpers.credentials import TEST_JWT_SECRET, token_with_claims

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class CountingVerifier:
    """A TokenVerifier that knows tokens "good-<subject>-<seconds to live>" and counts calls."""

    def __init__(self, clock: SettableClock) -> None:
        self.clock = clock
        self.calls: Counter[str] = Counter()

    async def verify(self, token: str) -> Principal:
        self.calls[token] += 1
        kind, subject, ttl = token.split("-")
        if kind != "good":
            raise Unauthenticated()
        expires_at = START + timedelta(seconds=int(ttl))
        if self.clock.now() >= expires_at:
            raise Unauthenticated()
        return Principal(subject, frozenset({"payments.read"}), expires_at)


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock(START)


async def test_a_token_is_verified_once_until_it_expires(clock: SettableClock) -> None:
    inner = CountingVerifier(clock)
    cached = CachedVerifier(inner, clock)
    first = await cached.verify("good-svc-60")
    for _ in range(5):
        assert await cached.verify("good-svc-60") == first
    assert inner.calls["good-svc-60"] == 1

    clock.advance(timedelta(seconds=59))
    assert await cached.verify("good-svc-60") == first
    assert inner.calls["good-svc-60"] == 1

    clock.advance(timedelta(seconds=1))  # at exp: the inner verifier decides again
    with pytest.raises(Unauthenticated):
        await cached.verify("good-svc-60")
    assert inner.calls["good-svc-60"] == 2
    assert len(cached) == 0


async def test_refusals_are_not_remembered(clock: SettableClock) -> None:
    inner = CountingVerifier(clock)
    cached = CachedVerifier(inner, clock)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await cached.verify("bad-svc-60")
    assert inner.calls["bad-svc-60"] == 3
    assert len(cached) == 0


async def test_the_least_recently_used_token_goes_first_beyond_the_bound(
    clock: SettableClock,
) -> None:
    inner = CountingVerifier(clock)
    cached = CachedVerifier(inner, clock, max_entries=2)
    await cached.verify("good-a-60")
    await cached.verify("good-b-60")
    await cached.verify("good-a-60")  # a is now the most recent
    await cached.verify("good-c-60")  # evicts b
    assert len(cached) == 2
    await cached.verify("good-a-60")
    await cached.verify("good-b-60")
    assert inner.calls == Counter({"good-a-60": 1, "good-b-60": 2, "good-c-60": 1})


async def test_each_token_gets_its_own_answer(clock: SettableClock) -> None:
    cached = CachedVerifier(CountingVerifier(clock), clock)
    a, b = await cached.verify("good-a-60"), await cached.verify("good-b-60")
    assert (a.subject, b.subject) == ("a", "b")


async def test_with_the_real_verifier_a_tampered_token_is_still_refused() -> None:
    clock = SettableClock()
    cached = CachedVerifier(
        JwtVerifier(
            algorithms=["HS256"],
            audience="payment-service",
            issuer="payment-grpc",
            secret=TEST_JWT_SECRET,
        ),
        clock,
    )
    token = token_with_claims(sub="svc-a")
    assert (await cached.verify(token)).subject == "svc-a"
    header, _, signature = token.split(".")
    other_payload = token_with_claims(sub="svc-admin").split(".")[1]
    tampered = f"{header}.{other_payload}.{signature}"  # svc-a's signature on other claims
    with pytest.raises(Unauthenticated):
        await cached.verify(tampered)
    assert len(cached) == 1
