"""Public keys for RS256/ES256 tokens, by `kid`: from a JWKS file or from a remote source
(the auth service), parsed with PyJWT's PyJWKSet."""

from __future__ import annotations

import asyncio
import pathlib
from datetime import UTC, datetime, timedelta
from typing import Protocol

import jwt

from payment_grpc.service.errors import AuthUnavailable
from payment_grpc.service.ports import Clock

NEVER = datetime.min.replace(tzinfo=UTC)


class PublicKeys(Protocol):
    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The verification key with this id, None if unknown; AuthUnavailable if unsure."""
        ...


class JwksSource(Protocol):
    async def signing_keys(self) -> str:
        """The current JWKS document; raises AuthUnavailable when it cannot be had."""
        ...


def keys_by_id(jwks_json: str) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document; raises PyJWTError or ValueError if malformed."""
    keys = jwt.PyJWKSet.from_json(jwks_json).keys
    return {key.key_id or "": key for key in keys if key.public_key_use in (None, "sig")}


class JwksFileKeys:
    """Public keys read once from a JWKS file."""

    def __init__(self, path: pathlib.Path) -> None:
        self._keys = keys_by_id(path.read_text())

    async def key(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)


class RemoteKeys:
    """Keys fetched from `source` and cached for `max_age`.

    An unknown `kid` (a key rotated in) triggers a refetch, at most once per
    `refresh_interval` so that made-up kids cannot flood the source; after a failed fetch
    the next one is not delayed. Concurrent callers share one fetch. Nothing fetched (or
    only stale keys) and the source down: AuthUnavailable (fail closed).
    """

    def __init__(
        self,
        source: JwksSource,
        *,
        clock: Clock,
        refresh_interval: timedelta,
        max_age: timedelta,
    ) -> None:
        self._source = source
        self._clock = clock
        self._refresh_interval = refresh_interval
        self._max_age = max_age
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = NEVER
        self._tried_at = NEVER
        self._failed = False
        self._fetches = 0
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        if self._needs_fetch(kid, self._clock.now()):
            await self._fetch_once()
        return self._keys.get(kid)

    def _needs_fetch(self, kid: str, now: datetime) -> bool:
        if now - self._fetched_at >= self._max_age:
            return True
        if kid in self._keys:
            return False
        return self._failed or now - self._tried_at >= self._refresh_interval

    async def _fetch_once(self) -> None:
        seen = self._fetches
        async with self._lock:
            if self._fetches == seen:  # else a fetch ended while we waited: use its outcome
                await self._fetch()
        if self._failed:
            raise AuthUnavailable()

    async def _fetch(self) -> None:
        self._fetches += 1
        self._tried_at = self._clock.now()
        self._failed = True
        jwks = await self._source.signing_keys()
        try:
            self._keys = keys_by_id(jwks)
        except (jwt.PyJWTError, ValueError) as exc:
            raise AuthUnavailable() from exc
        self._fetched_at = self._tried_at
        self._failed = False
