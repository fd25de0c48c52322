"""The tests' secrets, tokens, and channels that send them."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt as pyjwt
from grpc import aio

from payment_grpc.adapters.auth.tokens import mint_token

TEST_JWT_SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


# Shared by every test server (like the JWT secret), so replicas with their own DATA_DIR
# read each other's rows; "test" is a kid, the rest base64 of a 32-byte AES key.
TEST_ENCRYPTION_KEYS = "test:cGF5bWVudC1ncnBjLXRlc3QtZW5jcnlwdGlvbi1rZXk="


ADMIN_SCOPES = ("payments.admin",)


def token(
    scopes: tuple[str, ...] = ADMIN_SCOPES,
    *,
    subject: str = "svc-tests",
    customer_id: str | None = None,
    secret: str = TEST_JWT_SECRET,
) -> str:
    return mint_token(
        secret,
        subject=subject,
        scopes=scopes,
        audience="payment-service",
        issuer="payment-grpc",
        customer_id=customer_id,
    )


def bearer(jwt: str | None = None) -> tuple[str, str]:
    return ("authorization", f"Bearer {jwt or token()}")


class _Metadata:
    def __init__(self, jwt: str | None, keys: bool) -> None:
        self._authorization = bearer(jwt)
        self._keys = keys

    def _with(self, details, unary: bool):  # type: ignore[no-untyped-def]
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.append(self._authorization)
        if unary and self._keys and not any(key == "idempotency-key" for key, _ in metadata):
            metadata.append(("idempotency-key", uuid.uuid4().hex))
        return details._replace(metadata=metadata)


class _UnaryMetadata(_Metadata, aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with(details, unary=True), request)


class _StreamMetadata(_Metadata, aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with(details, unary=False), request)


def client_metadata(jwt: str | None = None, *, keys: bool = True) -> list[Any]:
    """Like a client library: a bearer token on every call, and a fresh idempotency-key on
    every unary call that does not carry one. Pass as a channel's interceptors."""
    return [_UnaryMetadata(jwt, keys), _StreamMetadata(jwt, keys)]


def ClientMetadata(jwt: str | None = None, *, keys: bool = True) -> Any:  # noqa: N802
    raise TypeError("use client_metadata()")  # pragma: no cover


FreshIdempotencyKey = ClientMetadata


def token_with_claims(secret: str = TEST_JWT_SECRET, **claims: Any) -> str:
    """An HS256 token with valid defaults overridden by `claims` (a None value drops one)."""
    now = int(time.time())
    defaults: dict[str, Any] = {"sub": "svc-tests", "scope": "payments.read",
                                "aud": "payment-service", "iss": "payment-grpc",
                                "iat": now, "nbf": now, "exp": now + 600}  # fmt: skip
    merged = {k: v for k, v in (defaults | claims).items() if v is not None}
    return pyjwt.encode(merged, secret, algorithm="HS256")
