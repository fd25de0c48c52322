"""Hostile tokens: every one is UNAUTHENTICATED, with nothing that helps the attacker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pathlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import Application, build_application
from tests.conftest import make_settings
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import TEST_JWT_SECRET

AUD, ISS = "payment-service", "payment-grpc"
SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
EC_OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_PEM = SIGNING_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "attacker", "scope": "payments.admin", "aud": AUD, "iss": ISS,
              "iat": now, "nbf": now, "exp": now + 600}  # fmt: skip
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def _hs256_with(secret: bytes, claims: dict[str, Any], kid: str = "k1") -> str:
    signing_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, claims)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _rs256(key: rsa.RSAPrivateKey, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def _tampered() -> str:
    header, _, signature = jwt.encode(
        _claims(scope="payments.read"), TEST_JWT_SECRET, algorithm="HS256"
    ).split(".")
    return f"{header}.{_b64(json.dumps(_claims()).encode())}.{signature}"


ATTACKS = {
    "alg-none": lambda: _unsigned({"alg": "none", "typ": "JWT"}, _claims()) + ".",
    "alg-none-upper": lambda: _unsigned({"alg": "NONE"}, _claims()) + ".",
    "hs-rs-confusion": lambda: _hs256_with(PUBLIC_PEM, _claims()),
    "tampered-payload": _tampered,
    "other-secret": lambda: jwt.encode(_claims(), "x" * 48, algorithm="HS256"),
    "other-rsa-key": lambda: _rs256(OTHER_KEY, _claims()),
    "expired": lambda: jwt.encode(_claims(exp=int(time.time()) - 3600), TEST_JWT_SECRET),
    "not-yet-valid": lambda: jwt.encode(_claims(nbf=int(time.time()) + 3600), TEST_JWT_SECRET),
    "far-future-iat": lambda: jwt.encode(_claims(iat=int(time.time()) + 3600), TEST_JWT_SECRET),
    "wrong-audience": lambda: jwt.encode(_claims(aud="other-service"), TEST_JWT_SECRET),
    "wrong-issuer": lambda: jwt.encode(_claims(iss="evil"), TEST_JWT_SECRET),
    "missing-exp": lambda: jwt.encode(_claims(exp=None), TEST_JWT_SECRET),
    "missing-sub": lambda: jwt.encode(_claims(sub=None), TEST_JWT_SECRET),
    "hs512-not-allowed": lambda: jwt.encode(_claims(), "y" * 64, algorithm="HS512"),
    "100kb": lambda: jwt.encode(_claims(pad="p" * 75_000), TEST_JWT_SECRET),  # ~100 KB
    "garbage": lambda: "not.a.jwt",
    "empty-segments": lambda: "..",
    "binary-junk": lambda: _b64(bytes(range(256))),
}


@pytest.fixture
async def rs256_app(database_url: str, tmp_path: pathlib.Path) -> AsyncIterator[Application]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNING_KEY.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    settings = make_settings(
        database_url, tmp_path, jwt_algorithms="HS256,RS256", jwt_jwks_file=jwks
    )
    app = build_application(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def _list_with(app: Application, authorization: str) -> Any:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        return await rpc_error(
            stub.ListPayments(
                api.ListPaymentsRequest(), metadata=(("authorization", authorization),)
            )
        )


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_attack_is_unauthenticated(rs256_app: Application, attack: str) -> None:
    error = await _list_with(rs256_app, f"Bearer {ATTACKS[attack]()}")
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.message == "missing or invalid credentials"
    assert error.info.reason == "UNAUTHENTICATED"
    assert dict(error.info.metadata) == {}


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "token abc"])
async def test_malformed_authorization_header(rs256_app: Application, header: str) -> None:
    assert (await _list_with(rs256_app, header)).code == grpc.StatusCode.UNAUTHENTICATED


async def test_valid_rs256_and_hs256_tokens_are_accepted(rs256_app: Application) -> None:
    for good in (_rs256(SIGNING_KEY, _claims()), jwt.encode(_claims(), TEST_JWT_SECRET)):
        async with aio.insecure_channel(f"127.0.0.1:{rs256_app.port}") as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            reply = await stub.ListPayments(
                api.ListPaymentsRequest(), metadata=(("authorization", f"Bearer {good}"),)
            )
        assert list(reply.payments) == []


async def test_small_clock_skew_is_tolerated(rs256_app: Application) -> None:
    skewed = jwt.encode(
        _claims(nbf=int(time.time()) + 10, iat=int(time.time()) + 10), TEST_JWT_SECRET
    )
    async with aio.insecure_channel(f"127.0.0.1:{rs256_app.port}") as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        reply = await stub.ListPayments(
            api.ListPaymentsRequest(), metadata=(("authorization", f"Bearer {skewed}"),)
        )
    assert list(reply.payments) == []


def test_the_big_token_is_about_100_kb() -> None:
    assert 95_000 < len(ATTACKS["100kb"]()) < 110_000


async def test_metadata_above_the_limit_is_refused_and_the_server_keeps_serving(
    rs256_app: Application,
) -> None:
    error = await _list_with(rs256_app, "Bearer " + "a" * 200_000)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    again = await _list_with(rs256_app, "Bearer junk")
    assert again.code == grpc.StatusCode.UNAUTHENTICATED


def _jwks_file(tmp_path: pathlib.Path) -> pathlib.Path:
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNING_KEY.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_SIGNING_KEY.public_key()))
    path = tmp_path / "jwks.json"
    keys = [{**rsa_jwk, "kid": "k1", "alg": "RS256"}, {**ec_jwk, "kid": "e1", "alg": "ES256"}]
    path.write_text(json.dumps({"keys": keys}))
    return path


@pytest.fixture
async def jwks_app(
    database_url: str, tmp_path: pathlib.Path, request
) -> AsyncIterator[Application]:  # type: ignore[no-untyped-def]
    """A server with public keys only (JWKS file), allowing the algorithms in the param."""
    settings = make_settings(
        database_url, tmp_path, jwt_algorithms=request.param, jwt_jwks_file=_jwks_file(tmp_path)
    )
    app = build_application(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def _list_ok(app: Application, token: str) -> list[Any]:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        reply = await stub.ListPayments(
            api.ListPaymentsRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
    return list(reply.payments)


@pytest.mark.parametrize("jwks_app", ["RS256"], indirect=True)
async def test_hs_rs_confusion_against_an_rs256_only_server(jwks_app: Application) -> None:
    assert await _list_ok(jwks_app, _rs256(SIGNING_KEY, _claims())) == []
    for forged in (_hs256_with(PUBLIC_PEM, _claims()), _hs256_with(PUBLIC_PEM, _claims(), "")):
        error = await _list_with(jwks_app, f"Bearer {forged}")
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert error.message == "missing or invalid credentials"


@pytest.mark.parametrize("jwks_app", ["ES256"], indirect=True)
async def test_es256_tokens_verify_with_a_jwks_file(jwks_app: Application) -> None:
    good = jwt.encode(_claims(), EC_SIGNING_KEY, algorithm="ES256", headers={"kid": "e1"})
    assert await _list_ok(jwks_app, good) == []
    for bad in (
        jwt.encode(_claims(), EC_OTHER_KEY, algorithm="ES256", headers={"kid": "e1"}),
        jwt.encode(_claims(), EC_SIGNING_KEY, algorithm="ES256", headers={"kid": "k1"}),
        _rs256(SIGNING_KEY, _claims()),  # RS256 is not allowed on this server
    ):
        assert (await _list_with(jwks_app, f"Bearer {bad}")).code == grpc.StatusCode.UNAUTHENTICATED
