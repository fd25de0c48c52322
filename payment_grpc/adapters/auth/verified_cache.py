"""Verified tokens remembered until they expire: a decorator of any TokenVerifier.

A service client sends the same bearer token on thousands of calls; checking its
signature and claims once is enough. A cached answer is only ever the answer the inner
verifier gave for exactly these bytes, and it is dropped at the token's `exp` (no
leeway: after `exp` the inner verifier decides again, with its own leeway). Refusals are
not cached: every bad token is checked again. The cache holds at most `max_entries`
tokens (least recently used go first), keyed by the token's SHA-256 so a flood of large
tokens cannot grow memory beyond that bound.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass, field

from payment_grpc.service.ports import Clock, Principal, TokenVerifier

DEFAULT_MAX_ENTRIES = 10_000


@dataclass(eq=False)
class CachedVerifier:
    inner: TokenVerifier
    clock: Clock
    _: KW_ONLY
    max_entries: int = DEFAULT_MAX_ENTRIES
    _verified: OrderedDict[bytes, Principal] = field(
        init=False, repr=False, default_factory=OrderedDict
    )

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError("max_entries must be at least 1")

    async def verify(self, token: str) -> Principal:
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        principal = self._verified.get(key)
        if principal is not None:
            if self.clock.now() < principal.expires_at:
                self._verified.move_to_end(key)
                return principal
            del self._verified[key]
        principal = await self.inner.verify(token)  # raises for a bad token: not cached
        if self.clock.now() < principal.expires_at:
            self._remember(key, principal)
        return principal

    def _remember(self, key: bytes, principal: Principal) -> None:
        self._verified[key] = principal
        self._verified.move_to_end(key)
        while len(self._verified) > self.max_entries:
            self._verified.popitem(last=False)

    def __len__(self) -> int:
        return len(self._verified)
