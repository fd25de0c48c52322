"""The auth service client against a fake auth service that is a real gRPC server:
introspection (VerifyToken) and the RS256/ES256 signing keys it serves (GetSigningKeys)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.adapters.auth.jwt_verifier import JwtVerifier
from payment_grpc.adapters.clients.auth_client import AuthServiceClient, AuthServiceVerifier
from payment_grpc.bootstrap import Application, build_application
from payment_grpc.service.errors import Unauthenticated
from tests.conftest import make_settings
from tests.helpers.builders import charge_request
from tests.helpers.calls import rpc_error
from tests.helpers.clock import SettableClock
from tests.helpers.credentials import TEST_JWT_SECRET, client_metadata, token

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_NEXT = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(private: Any, kid: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if kid.startswith("rsa") else jwt.algorithms.ECAlgorithm
    return {**json.loads(algorithm.to_jwk(private.public_key())), "kid": kid, "use": "sig"}


def signed(private: Any, algorithm: str, kid: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "svc-keys", "scope": "payments.read", "aud": "payment-service",
            "iss": "payment-grpc", "iat": now, "exp": now + 600, **claims}  # fmt: skip
    return jwt.encode(body, private, algorithm=algorithm, headers={"kid": kid})


class FakeAuthService(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.revoked: set[str] = set()
        self.failures_left = 0  # answer `failure_code` this many times first
        self.failure_code = grpc.StatusCode.UNAVAILABLE
        self.hanging = False  # answer nothing until the test ends
        self.released = asyncio.Event()
        self.scopes: list[str] | None = None  # None: the token's own scopes
        self.customer_id = ""  # what the service says the token's customer is
        self.subject = ""  # "": the token's own subject
        self.expire_time: datetime | None = None  # None: five minutes from now
        self.key_calls = 0
        self.keys_down = False
        self.jwks = [public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1")]

    async def VerifyToken(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self.calls += 1
        if self.hanging:
            await self.released.wait()
        if self.failures_left:
            self.failures_left -= 1
            await context.abort(self.failure_code, "try again")
        claims = jwt.decode(request.token, options={"verify_signature": False})
        expires = Timestamp()
        expires.FromDatetime(self.expire_time or datetime.now(UTC) + timedelta(minutes=5))
        return auth_service_pb2.VerifyTokenResponse(
            active=request.token not in self.revoked,
            subject=self.subject or claims["sub"],
            scopes=claims["scope"].split() if self.scopes is None else self.scopes,
            customer_id=self.customer_id,
            expire_time=expires,
        )

    async def GetSigningKeys(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self.key_calls += 1
        if self.hanging:
            await self.released.wait()
        if self.keys_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        return auth_service_pb2.GetSigningKeysResponse(jwks_json=json.dumps({"keys": self.jwks}))


@pytest.fixture
async def auth_service() -> AsyncIterator[tuple[FakeAuthService, aio.Server, int]]:
    fake = FakeAuthService()
    server = aio.server()
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, server, port
    fake.released.set()
    await server.stop(None)


StartApp = Callable[..., Awaitable[Application]]


@pytest.fixture
async def start_app(
    database_url: str, tmp_path: pathlib.Path, auth_service
) -> AsyncIterator[StartApp]:  # type: ignore[no-untyped-def]
    """Start a payment server using the fake auth service, with these settings."""
    _, _, port = auth_service
    apps: list[Application] = []

    async def start(**overrides: Any) -> Application:
        settings = make_settings(
            database_url, tmp_path, auth_service_addr=f"127.0.0.1:{port}", **overrides
        )
        app = build_application(settings)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def introspecting_app(start_app: StartApp) -> Application:
    return await start_app()


async def _list(app: Application, bearer: str):  # type: ignore[no-untyped-def]
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        return await stub.ListPayments(
            api.ListPaymentsRequest(), metadata=(("authorization", f"Bearer {bearer}"),)
        )


async def test_active_token_is_accepted_and_cached(introspecting_app, auth_service) -> None:
    fake, _, _ = auth_service
    jwt = token(("payments.read",))
    await _list(introspecting_app, jwt)
    await _list(introspecting_app, jwt)
    assert fake.calls == 1


async def test_revoked_token_is_unauthenticated(introspecting_app, auth_service) -> None:
    fake, _, _ = auth_service
    jwt = token(("payments.read",), subject="revoked")
    fake.revoked.add(jwt)
    error = await rpc_error(_list(introspecting_app, jwt))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


async def test_transient_failures_are_retried(introspecting_app, auth_service) -> None:
    fake, _, _ = auth_service
    fake.failures_left = 2
    await _list(introspecting_app, token(("payments.read",), subject="retry"))
    assert fake.calls == 3


async def test_auth_service_down_fails_closed_but_cached_answers_hold(
    introspecting_app, auth_service
) -> None:
    _, server, _ = auth_service
    known = token(("payments.read",), subject="known")
    await _list(introspecting_app, known)
    await server.stop(None)
    await _list(introspecting_app, known)  # still cached
    error = await rpc_error(_list(introspecting_app, token(("payments.read",), subject="new")))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.info.reason == "AUTH_UNAVAILABLE"
    assert error.has_retry


async def test_locally_invalid_tokens_never_reach_the_auth_service(
    introspecting_app, auth_service
) -> None:
    fake, _, _ = auth_service
    error = await rpc_error(_list(introspecting_app, "not.a.jwt"))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert fake.calls == 0


class TestIntrospectionNeverWidens:
    async def test_broader_scopes_from_the_service_are_not_granted(
        self, introspecting_app, auth_service
    ) -> None:
        fake, _, _ = auth_service
        fake.scopes = ["payments.read", "payments.charge", "payments.admin"]
        reader = token(("payments.read",), subject="svc-reports")
        async with aio.insecure_channel(
            f"127.0.0.1:{introspecting_app.port}", interceptors=client_metadata(reader)
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            error = await rpc_error(stub.Charge(charge_request()))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert fake.calls == 1

    async def test_a_customer_token_stays_its_customers(
        self, introspecting_app, auth_service
    ) -> None:
        fake, _, _ = auth_service
        mine, theirs = await _charge_for(introspecting_app, "cus_me", "cus_other")
        fake.scopes = ["payments.read", "payments.charge", "payments.admin"]  # no customer_id
        customer = token(("payments.read",), subject="cus_me", customer_id="cus_me")
        async with aio.insecure_channel(
            f"127.0.0.1:{introspecting_app.port}", interceptors=client_metadata(customer)
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            listed = await stub.ListPayments(api.ListPaymentsRequest())
            hidden = await rpc_error(stub.GetPayment(api.GetPaymentRequest(payment_id=theirs)))
            charge = await rpc_error(stub.Charge(charge_request(customer_id="cus_me")))
        assert [p.payment_id for p in listed.payments] == [mine]
        assert hidden.code == grpc.StatusCode.NOT_FOUND
        assert charge.code == grpc.StatusCode.PERMISSION_DENIED

    async def test_the_service_may_narrow_a_token_to_a_customer(
        self, introspecting_app, auth_service
    ) -> None:
        fake, _, _ = auth_service
        mine, _ = await _charge_for(introspecting_app, "cus_me", "cus_other")
        fake.customer_id = "cus_me"
        jwt = token(("payments.read", "payments.charge"), subject="cus_me")
        async with aio.insecure_channel(
            f"127.0.0.1:{introspecting_app.port}", interceptors=client_metadata(jwt)
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            listed = await stub.ListPayments(api.ListPaymentsRequest())
            charge = await rpc_error(stub.Charge(charge_request(customer_id="cus_me")))
        assert [p.payment_id for p in listed.payments] == [mine]
        assert charge.code == grpc.StatusCode.PERMISSION_DENIED

    async def test_another_customer_from_the_service_is_unauthenticated(
        self, introspecting_app, auth_service
    ) -> None:
        fake, _, _ = auth_service
        fake.customer_id = "cus_other"
        customer = token(("payments.read",), subject="cus_me", customer_id="cus_me")
        error = await rpc_error(_list(introspecting_app, customer))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED

    async def test_another_subject_from_the_service_is_unauthenticated(
        self, introspecting_app, auth_service
    ) -> None:
        fake, _, _ = auth_service
        fake.subject = "svc-admin"
        error = await rpc_error(_list(introspecting_app, token(("payments.read",))))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED


async def _charge_for(app: Application, *customers: str) -> list[str]:
    async with aio.insecure_channel(
        f"127.0.0.1:{app.port}", interceptors=client_metadata()
    ) as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        return [
            (await stub.Charge(charge_request(1_000, customer_id=c))).payment.payment_id
            for c in customers
        ]


KEYED = {"jwt_algorithms": "RS256,ES256"}  # no JWKS file: keys come from the auth service


class TestSigningKeysFromTheAuthService:
    async def test_rs256_and_es256_tokens_verify_with_served_keys(
        self, start_app, auth_service
    ) -> None:
        fake, _, _ = auth_service
        app = await start_app(**KEYED)
        for good in (signed(RSA_KEY, "RS256", "rsa-1"), signed(EC_KEY, "ES256", "ec-1")):
            assert list((await _list(app, good)).payments) == []
        assert fake.key_calls == 1  # fetched once, then cached

    @pytest.mark.parametrize(
        "forged",
        [
            lambda: signed(RSA_NEXT, "RS256", "rsa-1"),  # right kid, other key
            lambda: signed(EC_KEY, "ES256", "rsa-1"),  # an RSA key's kid on an ES256 token
            lambda: jwt.encode({"sub": "x"}, TEST_JWT_SECRET, headers={"kid": "rsa-1"}),
        ],
    )
    async def test_tokens_not_signed_by_a_served_key_are_unauthenticated(
        self, start_app, forged
    ) -> None:
        app = await start_app(**KEYED)
        error = await rpc_error(_list(app, forged()))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED

    async def test_a_key_rotated_in_is_fetched_for_its_unknown_kid(
        self, start_app, auth_service
    ) -> None:
        fake, _, _ = auth_service
        app = await start_app(**KEYED, auth_keys_refresh_seconds=0)
        await _list(app, signed(RSA_KEY, "RS256", "rsa-1"))
        fake.jwks.append(public_jwk(RSA_NEXT, "rsa-2"))
        assert list((await _list(app, signed(RSA_NEXT, "RS256", "rsa-2"))).payments) == []
        assert fake.key_calls == 2

    async def test_unknown_kids_do_not_refetch_within_the_interval(
        self, start_app, auth_service
    ) -> None:
        fake, _, _ = auth_service
        app = await start_app(**KEYED, auth_keys_refresh_seconds=3600)
        await _list(app, signed(RSA_KEY, "RS256", "rsa-1"))
        for kid in ("made-up-1", "made-up-2"):
            error = await rpc_error(_list(app, signed(RSA_KEY, "RS256", kid)))
            assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert fake.key_calls == 1

    async def test_no_keys_and_the_service_down_fails_closed(self, start_app, auth_service) -> None:
        fake, _, _ = auth_service
        app = await start_app(**KEYED)
        fake.keys_down = True
        error = await rpc_error(_list(app, signed(RSA_KEY, "RS256", "rsa-1")))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.info.reason == "AUTH_UNAVAILABLE"
        assert fake.key_calls == 3  # UNAVAILABLE is transient: retried
        assert fake.calls == 0  # never introspected a token it could not verify
        fake.keys_down = False
        assert list((await _list(app, signed(RSA_KEY, "RS256", "rsa-1"))).payments) == []

    async def test_a_hanging_key_fetch_hits_the_deadline(self, start_app, auth_service) -> None:
        fake, _, _ = auth_service
        app = await start_app(**KEYED, auth_timeout_seconds=0.2)
        fake.hanging = True
        error = await asyncio.wait_for(rpc_error(_list(app, signed(EC_KEY, "ES256", "ec-1"))), 10)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert fake.calls == 0


class TestResilience:
    async def test_a_hanging_auth_service_hits_the_deadline(self, start_app, auth_service) -> None:
        fake, _, _ = auth_service
        app = await start_app(auth_timeout_seconds=0.2)
        fake.hanging = True
        error = await asyncio.wait_for(rpc_error(_list(app, token(("payments.read",)))), 10)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.info.reason == "AUTH_UNAVAILABLE"
        assert 1 <= fake.calls <= 3  # DEADLINE_EXCEEDED is transient: retried, then given up

    @pytest.mark.parametrize(
        ("code", "answer"),
        [
            (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE),
            (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED),
        ],
    )
    async def test_non_transient_codes_are_not_retried(
        self, introspecting_app, auth_service, code, answer
    ) -> None:
        fake, _, _ = auth_service
        fake.failures_left, fake.failure_code = 3, code
        error = await rpc_error(_list(introspecting_app, token(("payments.read",))))
        assert error.code == answer
        assert fake.calls == 1


class TestCacheLifetime:
    """Straight against the verifier, so that a settable clock can move past the bounds."""

    @pytest.fixture
    async def verifier(self, auth_service) -> AsyncIterator[tuple[AuthServiceVerifier, Any]]:
        _, _, port = auth_service
        clock = SettableClock()
        client = AuthServiceClient(f"127.0.0.1:{port}")
        local = JwtVerifier(
            algorithms=["HS256"], audience="payment-service", issuer="payment-grpc",
            secret=TEST_JWT_SECRET,
        )  # fmt: skip
        verifier = AuthServiceVerifier(
            client, audience="payment-service", local=local,
            cache_ttl=timedelta(seconds=60), clock=clock,
        )  # fmt: skip
        yield verifier, clock
        await client.close()

    async def test_an_entry_lives_for_the_ttl_when_that_ends_first(
        self, verifier, auth_service
    ) -> None:
        fake, _, _ = auth_service
        checker, clock = verifier
        jwt_ = token(("payments.read",))
        await checker.verify(jwt_)
        clock.advance(timedelta(seconds=59.9))
        await checker.verify(jwt_)
        assert fake.calls == 1
        clock.advance(timedelta(seconds=0.1))
        await checker.verify(jwt_)
        assert fake.calls == 2

    async def test_an_entry_lives_until_exp_when_that_ends_first(
        self, verifier, auth_service
    ) -> None:
        fake, _, _ = auth_service
        checker, clock = verifier
        fake.expire_time = clock.now() + timedelta(seconds=10)
        jwt_ = token(("payments.read",))
        assert (await checker.verify(jwt_)).expires_at == fake.expire_time
        clock.advance(timedelta(seconds=9.9))
        await checker.verify(jwt_)
        assert fake.calls == 1
        clock.advance(timedelta(seconds=0.1))
        with pytest.raises(Unauthenticated):
            await checker.verify(jwt_)  # asked again: the service says it has expired
        assert fake.calls == 2
