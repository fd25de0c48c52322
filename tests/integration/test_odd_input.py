"""Odd values from outside never reach SQL or datetime arithmetic unchecked.

Validly signed tokens with claims of the wrong shape, length or characters, and page
tokens whose fields were forged, are answered UNAUTHENTICATED / INVALID_ARGUMENT with an
ErrorInfo: never UNKNOWN, never INTERNAL, nothing logged at ERROR, no row written. On
SQLite and PostgreSQL (PostgreSQL refuses NUL and strings longer than the column).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import grpc
import pytest
from grpc import aio
from hypothesis import strategies as st
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.bootstrap import Application
from tests.helpers.builders import charge_request, usd
from tests.helpers.calls import RichError
from tests.helpers.credentials import TEST_JWT_SECRET, client_metadata, token
from tests.helpers.db import row_counts
from tests.integration.test_hostile_input import assert_still_serving, run_examples

DOMAIN = "payments.v1"
AUD, ISS = "payment-service", "payment-grpc"
MAX_CLAIM_EXAMPLES = 60
MAX_PAGE_TOKEN_EXAMPLES = 60
# What a bad token or a bad page token may be answered with; anything else is a bug.
CLAIM_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: str, secret: str = TEST_JWT_SECRET) -> str:
    """An HS256 token over the exact payload text (so it may hold what json.dumps never
    writes: Infinity, NaN, lone surrogates)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64(payload.encode('utf-8', 'surrogatepass'))}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "svc-odd", "scope": "payments.admin", "aud": AUD, "iss": ISS,
            "iat": now, "nbf": now, "exp": now + 600}  # fmt: skip
    return {k: v for k, v in (base | overrides).items() if v is not None}


def signed_claims(**overrides: Any) -> str:
    return signed(json.dumps(claims(**overrides)))


async def outcome(call: Any) -> RichError | None:
    try:
        await call
    except aio.AioRpcError as error:
        return RichError(error)
    return None


def problems(error: RichError | None, allowed: frozenset[grpc.StatusCode]) -> list[str]:
    if error is None:
        return []
    if error.code not in allowed:
        return [f"answered {error.code.name}: {error.message!r}"]
    if error.info.domain != DOMAIN:
        return [f"{error.code.name} without ErrorInfo: {error.message!r}"]
    return []


def errors_logged(caplog: pytest.LogCaptureFixture, since: int) -> list[str]:
    return [
        f"logged {r.name}: {r.getMessage()[:200]!r}"
        for r in caplog.records[since:]
        if r.levelno >= logging.ERROR
    ]


async def charge_with(app: Application, jwt: str) -> RichError | None:
    async with aio.insecure_channel(
        f"127.0.0.1:{app.port}", interceptors=client_metadata(jwt)
    ) as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        return await outcome(stub.Charge(charge_request(1_000), timeout=10))


# ------------------------------------------------------------------ claims by example

ODD_CLAIMS: dict[str, str] = {
    "sub-256": signed_claims(sub="s" * 256),
    "sub-10k": signed_claims(sub="s" * 10_000),
    "sub-nul": signed_claims(sub="svc\x00odd"),
    "sub-control": signed_claims(sub="svc\x1bodd"),
    "sub-lone-surrogate": signed(json.dumps(claims(sub="svc")).replace('"svc"', '"\\ud800"')),
    "sub-number": signed_claims(sub=42),
    "sub-list": signed_claims(sub=["a"]),
    "scope-number": signed_claims(scope=7),
    "scope-bool": signed_claims(scope=True),
    "scope-nested-list": signed_claims(scope=[["payments.admin"]]),
    "scope-object": signed_claims(scope={"payments.admin": True}),
    "roles-number": signed_claims(roles=3),
    "roles-string-of-objects": signed_claims(roles=[{"customer": 1}]),
    "customer_id-number": signed_claims(customer_id=12),
    "customer_id-129": signed_claims(customer_id="c" * 129),
    "customer_id-nul": signed_claims(customer_id="cus\x00"),
    "customer-role-long-sub": signed_claims(sub="c" * 200, roles=["customer"]),
    "exp-10^12": signed_claims(exp=10**12),
    "exp-10^30": signed_claims(exp=10**30),
    "exp-infinity": signed(json.dumps(claims()).replace('"exp": ', '"exp": Infinity, "x": ')),
    "exp-nan": signed(json.dumps(claims()).replace('"exp": ', '"exp": NaN, "x": ')),
    "iat-10^30": signed_claims(iat=10**30),
    "nbf-infinity": signed(json.dumps(claims()).replace('"nbf": ', '"nbf": -Infinity, "x": ')),
    "aud-number": signed_claims(aud=5),
    "iss-list": signed_claims(iss=["payment-grpc"]),
}


async def test_odd_claims_are_unauthenticated_on_charge(app: Application, caplog) -> None:
    caplog.set_level(logging.WARNING)
    before = await row_counts(app)
    found: list[str] = []
    for name, jwt in ODD_CLAIMS.items():
        logged = len(caplog.records)
        error = await charge_with(app, jwt)
        if error is None or error.code != grpc.StatusCode.UNAUTHENTICATED:
            found.append(f"[{name}] {error.code.name if error else 'OK'}")
        found += [f"[{name}] {p}" for p in problems(error, CLAIM_CODES)]
        found += [f"[{name}] {p}" for p in errors_logged(caplog, logged)]
    assert not found, "\n".join(found)
    assert await row_counts(app) == before


async def test_a_subject_at_the_column_limit_charges(app: Application) -> None:
    """255 printable characters is the longest subject storage holds: accepted, and the
    retry with the same key replays (the scope column holds it whole)."""
    jwt = token(subject="s" * 255)
    async with aio.insecure_channel(
        f"127.0.0.1:{app.port}", interceptors=client_metadata(jwt, keys=False)
    ) as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        request = charge_request(1_000)
        metadata = (("idempotency-key", "long-subject"),)
        first = await stub.Charge(request, metadata=metadata, timeout=10)
        again = await stub.Charge(request, metadata=metadata, timeout=10)
    assert again.payment.payment_id == first.payment.payment_id


# ------------------------------------------------------------------ claims by hypothesis

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=300),
    st.sampled_from(["", " ", "\x00", "payments.admin", "customer", "a" * 256, "\ud800"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
CLAIM_NAMES = ("sub", "scope", "roles", "customer_id", "exp", "iat", "nbf", "aud", "iss")


@st.composite
def odd_claims(draw: st.DrawFn) -> str:
    """Valid claims with some replaced by any JSON value (or dropped), signed."""
    body: dict[str, Any] = claims()
    for name in draw(st.lists(st.sampled_from(CLAIM_NAMES), min_size=1, max_size=4)):
        body[name] = draw(JSON_VALUES)
    body = {k: v for k, v in body.items() if v is not None}
    return signed(json.dumps(body, ensure_ascii=draw(st.booleans())))


async def test_generated_claims_get_a_clear_answer(app: Application, caplog) -> None:
    caplog.set_level(logging.WARNING)

    async def check(jwt: str) -> list[str]:
        logged = len(caplog.records)
        before = await row_counts(app)
        error = await charge_with(app, jwt)
        found = problems(error, CLAIM_CODES) + errors_logged(caplog, logged)
        if error is not None and await row_counts(app) != before:
            found.append("a refused call changed rows")
        return found

    await run_examples(odd_claims(), check, MAX_CLAIM_EXAMPLES)
    async with aio.insecure_channel(
        f"127.0.0.1:{app.port}", interceptors=client_metadata()
    ) as channel:
        await assert_still_serving(app, payment_service_pb2_grpc.PaymentServiceStub(channel))


# ------------------------------------------------------------------ page tokens


def _decode(page_token: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(base64.urlsafe_b64decode(page_token + "=" * 4))
    return body


def _encode(body: object) -> str:
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def _real_tokens(stub: Any) -> tuple[str, str, str]:
    """A next_page_token of ListPayments and of ListRefunds, and the refunded payment."""
    first = await stub.Charge(charge_request(5_000), timeout=10)
    await stub.Charge(charge_request(5_000), timeout=10)
    payment_id = first.payment.payment_id
    for _ in range(2):
        await stub.Refund(api.RefundRequest(payment_id=payment_id, amount=usd(100)), timeout=10)
    payments_page = await stub.ListPayments(api.ListPaymentsRequest(page_size=1), timeout=10)
    refunds_page = await stub.ListRefunds(
        api.ListRefundsRequest(payment_id=payment_id, page_size=1), timeout=10
    )
    assert payments_page.next_page_token
    assert refunds_page.next_page_token
    return payments_page.next_page_token, refunds_page.next_page_token, payment_id


FORGED_FIELDS: dict[str, object] = {
    "i-nul": ("i", "pay_\x00"),
    "i-control": ("i", "pay_\x1b"),
    "i-surrogate": ("i", "\ud800"),
    "i-number": ("i", 12),
    "i-list": ("i", ["pay_1"]),
    "i-65": ("i", "p" * 65),
    "i-emoji": ("i", "pay_\U0001f4b8"),
    "i-empty": ("i", ""),
    "t-nul": ("t", "2026-01-01T00:00:00\x00+00:00"),
    "t-number": ("t", 5),
    "t-year-1": ("t", "0001-01-01T00:00:00+14:00"),
    "t-year-9999": ("t", "9999-12-31T23:59:59-14:00"),
    "f-number": ("f", 1),
}


async def test_forged_page_token_fields_are_invalid_argument(
    app: Application, stub: Any, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    payments_token, refunds_token, payment_id = await _real_tokens(stub)
    found: list[str] = []
    for name, (field, value) in FORGED_FIELDS.items():  # type: ignore[misc]
        for rpc, real, request in (
            ("ListPayments", payments_token, lambda t: api.ListPaymentsRequest(page_token=t)),
            (
                "ListRefunds",
                refunds_token,
                lambda t: api.ListRefundsRequest(payment_id=payment_id, page_token=t),
            ),
        ):
            body = _decode(real) | {field: value}
            logged = len(caplog.records)
            error = await outcome(getattr(stub, rpc)(request(_encode(body)), timeout=10))
            if error is None or error.code != grpc.StatusCode.INVALID_ARGUMENT:
                found.append(f"[{rpc} {name}] {error.code.name if error else 'OK'}")
            found += [f"[{rpc} {name}] {p}" for p in errors_logged(caplog, logged)]
    assert not found, "\n".join(found)


@st.composite
def forged_tokens(draw: st.DrawFn, real: str) -> str:
    body: Any = _decode(real)
    kind = draw(st.sampled_from(("field", "body", "text")))
    if kind == "text":
        return draw(st.text(max_size=600))
    if kind == "body":
        return _encode(draw(JSON_VALUES))
    for name in draw(st.lists(st.sampled_from(("t", "i", "f", "x")), min_size=1, max_size=3)):
        body[name] = draw(JSON_VALUES)
    return _encode(body)


PAGE_TOKEN_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


async def test_generated_page_tokens_get_a_clear_answer(
    app: Application, stub: Any, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    payments_token, refunds_token, payment_id = await _real_tokens(stub)

    async def check(drawn: tuple[str, str]) -> list[str]:
        rpc, page_token = drawn
        logged = len(caplog.records)
        request: Any = (
            api.ListPaymentsRequest(page_token=page_token)
            if rpc == "ListPayments"
            else api.ListRefundsRequest(payment_id=payment_id, page_token=page_token)
        )
        error = await outcome(getattr(stub, rpc)(request, timeout=10))
        return problems(error, PAGE_TOKEN_CODES) + errors_logged(caplog, logged)

    strategy = st.one_of(
        st.tuples(st.just("ListPayments"), forged_tokens(payments_token)),
        st.tuples(st.just("ListRefunds"), forged_tokens(refunds_token)),
    )
    await run_examples(strategy, check, MAX_PAGE_TOKEN_EXAMPLES)
    await assert_still_serving(app, stub)
