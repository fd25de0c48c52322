"""Local JWT verification with PyJWT: pinned algorithms, exp/nbf/iat/aud/iss checked.

Keys: an HMAC secret for HS256, and/or public keys (RS256/ES256) chosen by `kid` from a
JWKS file or from the auth service (any `PublicKeys`). Each algorithm family only ever
sees its own kind of key, so an HS256 token signed with an RSA public key as the "secret"
(algorithm confusion) fails, as does `alg: none`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import jwt

from payment_grpc.adapters.auth.keys import PublicKeys
from payment_grpc.service.errors import Unauthenticated
from payment_grpc.service.ports import Principal

CUSTOMER_SCOPES = frozenset({"payments.read"})  # a customer token reads, never moves money

MAX_TOKEN_BYTES = 8 * 1024
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


class JwtVerifier:
    def __init__(
        self,
        *,
        algorithms: list[str],
        audience: str,
        issuer: str | None,
        secret: str | None = None,
        public_keys: PublicKeys | None = None,
        leeway_s: float = 30.0,
    ) -> None:
        self._algorithms = algorithms
        self._audience = audience
        self._issuer = issuer
        self._secret = secret
        self._public_keys = public_keys
        self._leeway_s = leeway_s

    async def verify(self, token: str) -> Principal:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated()
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm not in self._algorithms:
                raise Unauthenticated()
            claims = jwt.decode(
                token,
                key=await self._key_for(algorithm, header.get("kid")),
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "iat", "sub", "aud"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthenticated() from exc
        return principal_from_claims(claims)

    async def _key_for(self, algorithm: str, kid: object) -> Any:
        if algorithm in HMAC_ALGORITHMS:
            if not self._secret:
                raise Unauthenticated()
            return self._secret
        if self._public_keys is None:
            raise Unauthenticated()
        key = await self._public_keys.key(kid if isinstance(kid, str) else "")
        if key is None or key.algorithm_name != algorithm:
            raise Unauthenticated()
        return key.key


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The caller named by verified claims; a customer token must name its customer."""
    scopes = claims.get("scope", "")
    granted = frozenset(scopes.split() if isinstance(scopes, str) else scopes or ())
    subject = _non_blank(claims["sub"])
    customer = claims.get("customer_id")
    if customer is None and "customer" in (claims.get("roles") or ()):
        customer = subject
    if customer is not None:
        customer = _non_blank(customer)
        granted &= CUSTOMER_SCOPES
    return Principal(
        subject=subject,
        scopes=granted,
        expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
        customer_id=customer,
    )


def _non_blank(value: object) -> str:
    # An empty id must never reach the queries, where "" means "no filter".
    if not isinstance(value, str) or not value.strip():
        raise Unauthenticated()
    return value
