"""The auth service (protos/auth/v1): token introspection on top of local checks, and the
public keys for RS256/ES256 tokens (`AuthServiceClient.signing_keys`).

Calls go through the shared resilience piece (adapters/resilience.py): a deadline
on every attempt (never past the incoming call's), retries of UNAVAILABLE and
DEADLINE_EXCEEDED only, and the auth service's own circuit breaker. Answers are cached
per token until min(exp, TTL). If the service cannot answer and nothing is cached, the
caller is refused with AuthUnavailable (fail closed). Introspection only ever narrows what
the locally verified token grants: it may revoke, drop scopes or add a customer
restriction, never the opposite.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc
from auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from grpc import aio

from payment_grpc.adapters.auth.jwt_verifier import CUSTOMER_SCOPES
from payment_grpc.adapters.resilience import (
    CallPolicy,
    CircuitOpen,
    Collaborator,
    DeadlinePassed,
)
from payment_grpc.service.errors import AuthUnavailable, Unauthenticated
from payment_grpc.service.limits import MAX_CUSTOMER_ID_LENGTH, storable_text
from payment_grpc.service.ports import Clock, Principal, TokenVerifier
from payment_grpc.telemetry.client import tracing_interceptors

REFUSED = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
MAX_CACHED = 10_000
Reply = TypeVar("Reply")


class AuthServiceClient:
    """One channel to auth.v1.AuthService; a deadline on every attempt."""

    def __init__(
        self, target: str, *, timeout_s: float = 1.0, attempts: int = 3, backoff_s: float = 0.05
    ) -> None:
        self._channel = aio.insecure_channel(target, interceptors=tracing_interceptors())
        self._stub = auth_service_pb2_grpc.AuthServiceStub(self._channel)
        self._service = Collaborator(
            "auth-service",
            CallPolicy(timeout_s=timeout_s, attempts=attempts, backoff_initial_s=backoff_s),
        )

    async def verify_token(self, token: str, audience: str) -> auth_service_pb2.VerifyTokenResponse:
        """Raises Unauthenticated when the service refuses the token, else AuthUnavailable."""
        request = auth_service_pb2.VerifyTokenRequest(token=token, audience=audience)
        return await self._call(
            lambda timeout: self._stub.VerifyToken(request, timeout=timeout), refused=REFUSED
        )

    async def signing_keys(self) -> str:
        """The JWKS of the service's token-signing keys; raises AuthUnavailable."""
        request = auth_service_pb2.GetSigningKeysRequest()
        reply = await self._call(
            lambda timeout: self._stub.GetSigningKeys(request, timeout=timeout),
            refused=frozenset(),
        )
        return reply.jwks_json

    async def _call(
        self,
        attempt: Callable[[float | None], Awaitable[Reply]],
        *,
        refused: frozenset[grpc.StatusCode],
    ) -> Reply:
        try:
            return await self._service.call(attempt)
        except aio.AioRpcError as exc:
            if exc.code() in refused:
                raise Unauthenticated() from exc
            raise AuthUnavailable() from exc
        except (CircuitOpen, DeadlinePassed) as exc:
            raise AuthUnavailable() from exc

    async def close(self) -> None:
        await self._channel.close(None)


@dataclass(eq=False)
class AuthServiceVerifier:
    client: AuthServiceClient
    _: KW_ONLY
    audience: str
    local: TokenVerifier
    cache_ttl: timedelta
    clock: Clock
    _cache: OrderedDict[str, Principal] = field(init=False, repr=False, default_factory=OrderedDict)

    async def verify(self, token: str) -> Principal:
        local = await self.local.verify(token)  # signature, expiry, audience first
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        now = self.clock.now()
        if cached is not None and cached.expires_at > now:
            return cached
        reply = await self.client.verify_token(token, self.audience)
        principal = narrowed(local, reply, now)
        self._remember(digest, principal, now)
        return principal

    def _remember(self, digest: str, principal: Principal, now: datetime) -> None:
        expires = min(principal.expires_at, now + self.cache_ttl)
        self._cache[digest] = Principal(
            principal.subject, principal.scopes, expires, principal.customer_id
        )
        self._cache.move_to_end(digest)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)


def narrowed(
    local: Principal, reply: auth_service_pb2.VerifyTokenResponse, now: datetime
) -> Principal:
    """The local principal as the auth service's answer restricts it (never widens)."""
    if not reply.active or reply.subject != local.subject:
        raise Unauthenticated()
    expires = reply.expire_time.ToDatetime(UTC) if reply.HasField("expire_time") else now
    if expires <= now:
        raise Unauthenticated()
    if reply.customer_id and not storable_text(reply.customer_id, MAX_CUSTOMER_ID_LENGTH):
        raise Unauthenticated()  # never a customer id storage cannot hold
    customer = local.customer_id or reply.customer_id or None
    if local.customer_id and reply.customer_id not in ("", local.customer_id):
        raise Unauthenticated()  # the two disagree about whose token this is
    scopes = local.scopes & frozenset(reply.scopes)
    return Principal(
        subject=local.subject,
        scopes=scopes & CUSTOMER_SCOPES if customer else scopes,
        expires_at=min(expires, local.expires_at),
        customer_id=customer,
    )
