"""Small helpers for tests: build requests, read rich errors, count rows."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt as pyjwt
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.auth.tokens import mint_token
from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.adapters.db.tables import idempotency_keys, payment_events, payments, refunds
from payment_grpc.api.responses import OPERATIONS
from payment_grpc.bootstrap import Application, build_application, build_cipher
from payment_grpc.config import Settings
from payment_grpc.service.ports import KeyRecord, Operation, RecoveryPoint

S = pb.PaymentStatus


def order_id() -> str:
    return f"ord_{uuid.uuid4().hex[:16]}"


def usd(amount_minor: int, currency: str = "USD") -> pb.Money:
    return pb.Money(currency=currency, amount_minor=amount_minor)


def card(token: str = "tok_visa") -> pb.PaymentMethod:
    return pb.PaymentMethod(card=pb.CardMethod(token=token))


def charge_request(
    amount: int = 10_000,
    method: pb.PaymentMethod | None = None,
    *,
    manual: bool = False,
    **fields: Any,
) -> api.ChargeRequest:
    fields.setdefault("order_id", order_id())
    return api.ChargeRequest(
        amount=usd(amount) if "currency" not in fields else usd(amount, fields.pop("currency")),
        payment_method=method or card(),
        capture_method=pb.CAPTURE_METHOD_MANUAL if manual else pb.CAPTURE_METHOD_AUTOMATIC,
        **fields,
    )


class RichError:
    """The google.rpc details of a failed call."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self.code = error.code()
        self.message = error.details()
        self.info = error_details_pb2.ErrorInfo()
        self.bad_request = error_details_pb2.BadRequest()
        self.retry = error_details_pb2.RetryInfo()
        status = rpc_status.from_call(error)
        self.has_retry = False
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(self.info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                detail.Unpack(self.bad_request)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                detail.Unpack(self.retry)
                self.has_retry = True

    @property
    def fields(self) -> set[str]:
        return {v.field for v in self.bad_request.field_violations}


async def rpc_error(call: Any) -> RichError:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return RichError(error)
    raise AssertionError("the call succeeded but an error was expected")


async def row_counts(app: Application) -> dict[str, int]:
    async with app.engine.connect() as conn:
        return {
            table.name: (
                await conn.execute(sa.select(sa.func.count()).select_from(table))
            ).scalar_one()
            for table in (payments, payment_events, refunds)
        }


async def events_of(app: Application, payment_id: str) -> list[tuple[int, str | None, str]]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(
                payment_events.c.sequence, payment_events.c.previous_status, payment_events.c.status
            )
            .where(payment_events.c.payment_id == payment_id)
            .order_by(payment_events.c.sequence)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def expire_idempotency_keys(app: Application) -> None:
    """Push every stored key past its retention, as if 72 h had gone by."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    async with app.engine.begin() as conn:
        await conn.execute(idempotency_keys.update().values(expires_at=past))


def operation_of(rpc: str) -> Operation:
    """The keyed operation an RPC of PaymentService (by its name) runs."""
    return OPERATIONS[f"/payments.v1.PaymentService/{rpc}"]


async def stored_key(
    app: Application, rpc: str, key: str, subject: str = "svc-tests"
) -> KeyRecord | None:
    """The key's record read through the real repository (its answer decrypted)."""
    uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))
    async with uow(read_only=True) as tx:
        return await tx.idempotency.get_for_update(subject, operation_of(rpc), key)


async def abandon_key(
    app: Application, rpc: str, key: str, point: RecoveryPoint, *, locked_at: datetime
) -> None:
    """Put a finished key back where a crash would have left it: its answer not yet
    stored, held by a replica that stopped at `locked_at`."""
    async with app.engine.begin() as conn:
        await conn.execute(
            idempotency_keys.update()
            .where(
                idempotency_keys.c.operation == operation_of(rpc).value,
                idempotency_keys.c.key == key,
            )
            .values(
                recovery_point=point.value,
                response_code=None,
                response_body=None,
                locked_by="replica-gone",
                locked_at=locked_at,
            )
        )


async def insert_pending_refund(
    app: Application, payment_id: str, amount_minor: int, *, updated_at: datetime
) -> str:
    """A refund row left PENDING (the gateway never answered), for the recovery worker."""
    refund_id = f"re_{uuid.uuid4().hex}"
    async with app.engine.begin() as conn:
        await conn.execute(
            refunds.insert().values(
                id=refund_id,
                payment_id=payment_id,
                currency="USD",
                amount_minor=amount_minor,
                status="PENDING",
                reason="UNSPECIFIED",
                gateway_reference="",
                failure_code="",
                created_at=updated_at,
                updated_at=updated_at,
            )
        )
    return refund_id


async def refund_status(app: Application, refund_id: str) -> str:
    async with app.engine.connect() as conn:
        query = sa.select(refunds.c.status).where(refunds.c.id == refund_id)
        return str((await conn.execute(query)).scalar_one())


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
) -> AsyncIterator[tuple[Application, payment_service_pb2_grpc.PaymentServiceStub]]:
    """A started application, its recovery worker's start-up pass done, and a stub that
    adds the admin token (no idempotency keys)."""
    app = build_application(settings)
    await app.start()
    try:
        await app.recovery.wait_for_passes(1)
        async with aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata(keys=False)
        ) as channel:
            yield app, payment_service_pb2_grpc.PaymentServiceStub(channel)
    finally:
        await app.stop()


def keyed(key: str) -> tuple[tuple[str, str], ...]:
    return (("idempotency-key", key),)


async def replayed(call: Any) -> bool:
    """Whether a finished unary call carried `idempotent-replayed: true`."""
    metadata = await call.initial_metadata()
    return ("idempotent-replayed", "true") in list(metadata or ())


async def replayed_error(call: Any) -> bool:
    """Whether a failed unary call's trailers carried `idempotent-replayed: true`."""
    return ("idempotent-replayed", "true") in list(await call.trailing_metadata() or ())


CLIENT_ATTEMPTS = 20


async def call_like_a_client(send: Callable[[], Any]) -> tuple[Any, bool]:
    """(answer, replayed?) of a keyed call, retried like the order service does: after
    ABORTED IDEMPOTENCY_KEY_IN_USE, again once the server's RetryInfo delay has passed."""
    for _ in range(CLIENT_ATTEMPTS):
        call = send()
        try:
            return await call, await replayed(call)
        except grpc.aio.AioRpcError as error:
            rich = RichError(error)
            if rich.info.reason != "IDEMPOTENCY_KEY_IN_USE" or not rich.has_retry:
                raise
            await asyncio.sleep(rich.retry.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError(f"the key was still in use after {CLIENT_ATTEMPTS} attempts")


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


class SettableClock:
    """A clock that moves only when the test says so (for caches bounded in time)."""

    def __init__(self, at: datetime | None = None) -> None:
        self.at = at or datetime.now(UTC)

    def now(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        self.at += delta
