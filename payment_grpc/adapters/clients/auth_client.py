"""Token introspection through the auth service (protos/auth/v1), on top of local checks.

Every call has a deadline; transient failures (UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED) are retried with exponential backoff and jitter; answers are cached
per token until min(exp, TTL). If the service cannot answer and nothing is cached, the
caller is refused with AuthUnavailable (fail closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import OrderedDict
from datetime import UTC, datetime, timedelta

import grpc
from auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from grpc import aio

from payment_grpc.domain.errors import AuthUnavailable, Unauthenticated
from payment_grpc.service.ports import Principal, TokenVerifier

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
REFUSED = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
MAX_CACHED = 10_000


class AuthServiceVerifier:
    def __init__(
        self,
        target: str,
        *,
        audience: str,
        local: TokenVerifier | None,
        cache_ttl: timedelta,
        timeout_s: float = 1.0,
        attempts: int = 3,
        backoff_s: float = 0.05,
    ) -> None:
        self._channel = aio.insecure_channel(target)
        self._stub = auth_service_pb2_grpc.AuthServiceStub(self._channel)
        self._audience = audience
        self._local = local
        self._cache_ttl = cache_ttl
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        if self._local is not None:
            await self._local.verify(token)  # signature, expiry, audience first
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        now = datetime.now(UTC)
        if cached is not None and cached.expires_at > now:
            return cached
        principal = await self._introspect(token, now)
        self._remember(digest, principal, now)
        return principal

    async def _introspect(self, token: str, now: datetime) -> Principal:
        reply = await self._call_with_retries(
            auth_service_pb2.VerifyTokenRequest(token=token, audience=self._audience)
        )
        if not reply.active or not reply.subject:
            raise Unauthenticated()
        expires = reply.expire_time.ToDatetime(UTC) if reply.HasField("expire_time") else now
        if expires <= now:
            raise Unauthenticated()
        scopes = frozenset(reply.scopes)
        customer = reply.customer_id or None
        return Principal(
            subject=reply.subject,
            scopes=scopes & {"payments.read"} if customer else scopes,
            expires_at=expires,
            customer_id=customer,
        )

    async def _call_with_retries(
        self, request: auth_service_pb2.VerifyTokenRequest
    ) -> auth_service_pb2.VerifyTokenResponse:
        for attempt in range(self._attempts):
            try:
                return await self._stub.VerifyToken(request, timeout=self._timeout_s)
            except aio.AioRpcError as exc:
                if exc.code() in REFUSED:
                    raise Unauthenticated() from exc
                if exc.code() not in TRANSIENT or attempt == self._attempts - 1:
                    raise AuthUnavailable() from exc
            delay = self._backoff_s * 2**attempt
            await asyncio.sleep(delay + random.uniform(0, delay))
        raise AuthUnavailable()

    def _remember(self, digest: str, principal: Principal, now: datetime) -> None:
        expires = min(principal.expires_at, now + self._cache_ttl)
        self._cache[digest] = Principal(
            principal.subject, principal.scopes, expires, principal.customer_id
        )
        self._cache.move_to_end(digest)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        await self._channel.close(None)
