"""Token introspection through a fake auth service that is a real gRPC server."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import Application, build_application
from tests.conftest import make_settings
from tests.helpers import rpc_error, token


class FakeAuthService(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.revoked: set[str] = set()
        self.failures_left = 0  # answer UNAVAILABLE this many times first

    async def VerifyToken(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self.calls += 1
        if self.failures_left:
            self.failures_left -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        expires = Timestamp()
        expires.FromDatetime(datetime.now(UTC) + timedelta(minutes=5))
        return auth_service_pb2.VerifyTokenResponse(
            active=request.token not in self.revoked,
            subject="svc-introspected",
            scopes=["payments.read"],
            expire_time=expires,
        )


@pytest.fixture
async def auth_service() -> AsyncIterator[tuple[FakeAuthService, aio.Server, int]]:
    fake = FakeAuthService()
    server = aio.server()
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, server, port
    await server.stop(None)


@pytest.fixture
async def introspecting_app(
    database_url: str, tmp_path: pathlib.Path, auth_service
) -> AsyncIterator[Application]:  # type: ignore[no-untyped-def]
    _, _, port = auth_service
    app = build_application(
        make_settings(database_url, tmp_path, auth_service_addr=f"127.0.0.1:{port}")
    )
    await app.start()
    yield app
    await app.stop()


async def _list(app: Application, jwt: str):  # type: ignore[no-untyped-def]
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        return await stub.ListPayments(
            api.ListPaymentsRequest(), metadata=(("authorization", f"Bearer {jwt}"),)
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
