"""Local JWT verification with PyJWT: pinned algorithms, exp/nbf/iat/aud/iss checked.

Keys: an HMAC secret for HS256, and/or public keys (RS256/ES256) chosen by `kid` from a
JWKS file or from the auth service (any `PublicKeys`). Each algorithm family only ever
sees its own kind of key, so an HS256 token signed with an RSA public key as the "secret"
(algorithm confusion) fails, as does `alg: none`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt

from payment_grpc.adapters.auth.keys import PublicKeys
from payment_grpc.service.errors import Unauthenticated
from payment_grpc.service.limits import MAX_CUSTOMER_ID_LENGTH, MAX_SUBJECT_LENGTH, storable_text
from payment_grpc.service.ports import Principal

CUSTOMER_SCOPES = frozenset({"payments.read"})  # a customer token reads, never moves money

MAX_TOKEN_BYTES = 8 * 1024
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


@dataclass(eq=False, kw_only=True)
class JwtVerifier:
    algorithms: list[str]
    audience: str
    issuer: str | None
    secret: str | None = field(default=None, repr=False)
    public_keys: PublicKeys | None = None
    leeway_s: float = 30.0

    async def verify(self, token: str) -> Principal:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated()
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm not in self.algorithms:
                raise Unauthenticated()
            claims = jwt.decode(
                token,
                key=await self._key_for(algorithm, header.get("kid")),
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "sub", "aud"]},
            )
            return principal_from_claims(claims)
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:
            # PyJWT's own checks of exp/nbf/iat raise OverflowError on Infinity.
            raise Unauthenticated() from exc

    async def _key_for(self, algorithm: str, kid: object) -> Any:
        if algorithm in HMAC_ALGORITHMS:
            if not self.secret:
                raise Unauthenticated()
            return self.secret
        if self.public_keys is None:
            raise Unauthenticated()
        key = await self.public_keys.key(kid if isinstance(kid, str) else "")
        if key is None or key.algorithm_name != algorithm:
            raise Unauthenticated()
        return key.key


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The caller named by verified claims; a customer token must name its customer.

    A signature proves who issued the claims, not that they have the shape we expect:
    every claim we use is checked for type, length and characters, and one of the wrong
    shape makes the token UNAUTHENTICATED (never a TypeError, never a value storage
    cannot hold).
    """
    subject = _storable(claims.get("sub"), MAX_SUBJECT_LENGTH)
    granted = _scopes(claims.get("scope"))
    customer = claims.get("customer_id")
    if customer is None and "customer" in _roles(claims.get("roles")):
        customer = subject
    if customer is not None:
        customer = _storable(customer, MAX_CUSTOMER_ID_LENGTH)
        granted &= CUSTOMER_SCOPES
    return Principal(
        subject=subject,
        scopes=granted,
        expires_at=_expiry(claims.get("exp")),
        customer_id=customer,
    )


def _storable(value: object, max_length: int) -> str:
    # An empty id must never reach the queries, where "" means "no filter"; a NUL or an
    # over-long id must never reach a column.
    if not storable_text(value, max_length):
        raise Unauthenticated()
    assert isinstance(value, str)
    return value


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Unauthenticated()
    return value


def _scopes(value: object) -> frozenset[str]:
    """`scope` is a space-separated string (RFC 8693) or a list of strings."""
    if value is None:
        return frozenset()
    return frozenset(value.split() if isinstance(value, str) else _strings(value))


def _roles(value: object) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else _strings(value)


def _expiry(value: object) -> datetime:
    # NumericDate (RFC 7519): a number of seconds; one past year 9999 is no date at all.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated()
    try:
        return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise Unauthenticated() from exc
