"""Minting tokens for the embedded default (`payment-grpc token`) and for tests."""

from __future__ import annotations

import time
from collections.abc import Iterable

import jwt


def mint_token(
    secret: str,
    *,
    subject: str,
    scopes: Iterable[str],
    audience: str,
    issuer: str,
    ttl_s: int = 3600,
    customer_id: str | None = None,
) -> str:
    if customer_id is not None and not customer_id.strip():
        raise ValueError("a customer token needs a customer id")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject,
        "scope": " ".join(scopes),
        "aud": audience,
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
    }
    if customer_id is not None:
        claims["customer_id"] = customer_id
    return jwt.encode(claims, secret, algorithm="HS256")
