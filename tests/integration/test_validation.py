"""Every protovalidate rule of the API is enforced before any use case runs: the caller
gets INVALID_ARGUMENT with ErrorInfo + BadRequest naming the field, and nothing is
written. Also page tokens that are malformed or bound to other filters."""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from tests.helpers.builders import card, charge_request, usd
from tests.helpers.calls import RichError, rpc_error
from tests.helpers.db import row_counts

INT64_MAX = 2**63 - 1
PAN = "4242424242424242"


def _charge(
    clear: str = "", method: pb.PaymentMethod | None = None, **fields: Any
) -> api.ChargeRequest:
    capture_method = fields.pop("capture_method", None)
    request = charge_request(**fields)
    if capture_method is not None:
        request.capture_method = capture_method
    if method is not None:
        request.payment_method.CopyFrom(method)
    if clear:
        request.ClearField(clear)
    return request


def _money(amount_minor: int = 1_000, currency: str = "USD") -> api.ChargeRequest:
    return _charge(amount=amount_minor, currency=currency)


def _metadata(pairs: dict[str, str]) -> api.ChargeRequest:
    return _charge(metadata=pairs)


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


def _call(stub: Any, rpc: str, request: Any) -> Any:
    if rpc == "WatchPaymentStatus":
        return _drain(stub.WatchPaymentStatus(request))
    return getattr(stub, rpc)(request)


def assert_invalid(error: RichError, field_pattern: str) -> None:
    """INVALID_ARGUMENT, ErrorInfo INVALID_ARGUMENT/payments.v1, and a BadRequest
    violation whose field path fully matches `field_pattern` (a regex)."""
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, (error.code, error.message)
    assert error.info.reason == "INVALID_ARGUMENT"
    assert error.info.domain == "payments.v1"
    assert any(re.fullmatch(field_pattern, f) for f in error.fields), error.fields
    for violation in error.bad_request.field_violations:
        assert violation.description


async def _expect_invalid(app: Any, call: Callable[[], Any], field_pattern: str) -> RichError:
    before = await row_counts(app)
    error = await rpc_error(call())
    assert_invalid(error, field_pattern)
    assert await row_counts(app) == before
    return error


CHARGE_CASES = [
    pytest.param(lambda: _charge(order_id=""), "order_id", id="order_id-empty"),
    pytest.param(lambda: _charge(order_id="o" * 129), "order_id", id="order_id-too-long"),
    pytest.param(lambda: _charge(order_id="ord 1/2"), "order_id", id="order_id-bad-chars"),
    pytest.param(lambda: _charge(clear="amount"), "amount", id="amount-missing"),
    pytest.param(lambda: _money(0), "amount", id="amount_minor-zero"),
    pytest.param(lambda: _money(-1), r"amount(\.amount_minor)?", id="amount_minor-negative"),
    pytest.param(
        lambda: _money(100_000_000_000), "amount.amount_minor", id="amount_minor-above-max"
    ),
    pytest.param(lambda: _money(INT64_MAX), "amount.amount_minor", id="amount_minor-int64-max"),
    pytest.param(lambda: _money(currency="usd"), "amount.currency", id="currency-lowercase"),
    pytest.param(lambda: _money(currency="XXX"), "amount.currency", id="currency-unknown"),
    pytest.param(lambda: _money(currency=""), "amount.currency", id="currency-empty"),
    pytest.param(lambda: _charge(clear="payment_method"), "payment_method", id="method-missing"),
    pytest.param(
        lambda: _charge(method=pb.PaymentMethod()),
        r"payment_method(\.kind)?",
        id="method-no-oneof",
    ),
    pytest.param(
        lambda: _charge(method=card("")), "payment_method.card.token", id="card-token-empty"
    ),
    pytest.param(
        lambda: _charge(method=card("tok visa!")),
        "payment_method.card.token",
        id="card-token-bad-chars",
    ),
    pytest.param(
        lambda: _charge(method=pb.PaymentMethod(upi=pb.UpiMethod(vpa="alice-at-okbank"))),
        "payment_method.upi.vpa",
        id="upi-vpa-malformed",
    ),
    pytest.param(
        lambda: _charge(
            method=pb.PaymentMethod(wallet=pb.WalletMethod(provider="Apple Pay", token="w1"))
        ),
        "payment_method.wallet.provider",
        id="wallet-provider-bad",
    ),
    pytest.param(
        lambda: _charge(method=pb.PaymentMethod(wallet=pb.WalletMethod(provider="apple_pay"))),
        "payment_method.wallet.token",
        id="wallet-token-empty",
    ),
    pytest.param(
        lambda: _charge(method=pb.PaymentMethod(net_banking=pb.NetBankingMethod(bank_code="hdfc"))),
        "payment_method.net_banking.bank_code",
        id="net_banking-bank_code-lowercase",
    ),
    pytest.param(
        lambda: _charge(method=pb.PaymentMethod(paypal=pb.PaypalMethod())),
        "payment_method.paypal.payer_token",
        id="paypal-payer_token-empty",
    ),
    pytest.param(lambda: _charge(capture_method=99), "capture_method", id="capture_method-unknown"),
    pytest.param(lambda: _charge(customer_id="c" * 129), "customer_id", id="customer_id-too-long"),
    pytest.param(lambda: _charge(customer_id="cus 1"), "customer_id", id="customer_id-bad-chars"),
    pytest.param(lambda: _charge(description="d" * 501), "description", id="description-too-long"),
    pytest.param(
        lambda: _metadata({f"k{i}": "v" for i in range(21)}),
        "metadata",
        id="metadata-too-many-pairs",
    ),
    pytest.param(lambda: _metadata({"bad key": "v"}), r"metadata\[.*\]", id="metadata-bad-key"),
    pytest.param(lambda: _metadata({"": "v"}), r"metadata\[.*\]", id="metadata-empty-key"),
    pytest.param(lambda: _metadata({"k" * 41: "v"}), r"metadata\[.*\]", id="metadata-key-too-long"),
    pytest.param(
        lambda: _metadata({"note": "v" * 501}), r"metadata\[.*\]", id="metadata-value-too-long"
    ),
    pytest.param(lambda: _charge(description="a\x00b"), "description", id="description-nul"),
    pytest.param(lambda: _charge(description="bell\x07"), "description", id="description-control"),
    pytest.param(lambda: _metadata({"note": "a\x00b"}), r"metadata\[.*\]", id="metadata-value-nul"),
]


@pytest.mark.parametrize(("build", "field"), CHARGE_CASES)
async def test_charge_constraint_is_invalid_argument(stub, app, build, field: str) -> None:
    await _expect_invalid(app, lambda: stub.Charge(build()), field)


async def test_charge_at_the_limits_is_accepted(stub) -> None:
    """The boundary values just inside every limit pass validation."""
    request = _charge(
        amount=99_999_999_999,
        order_id="o" * 128,
        customer_id="c" * 128,
        description="d" * 500,
        metadata={f"k{i:02d}{'x' * 37}": "v" * 500 for i in range(20)},
    )
    reply = await stub.Charge(request)
    assert reply.payment.amount.amount_minor == 99_999_999_999
    assert dict(reply.payment.metadata) == dict(request.metadata)


async def test_card_number_is_rejected_and_never_echoed(stub, app, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    before = await row_counts(app)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Charge(_charge(method=card(PAN), description="order", metadata={"k": "v"}))
    error = RichError(caught.value)
    assert_invalid(error, "payment_method.card.token")
    assert [v.description for v in error.bad_request.field_violations] == [
        "must be a gateway token, not a card number"
    ]
    assert await row_counts(app) == before
    status = rpc_status.from_call(caught.value)
    assert status is not None
    assert PAN not in (caught.value.details() or "")
    assert PAN.encode() not in status.SerializeToString()
    assert PAN not in repr(caught.value.trailing_metadata())
    assert PAN not in caplog.text


PAYMENT_ID_REQUESTS = {
    "GetPayment": api.GetPaymentRequest,
    "CapturePayment": api.CapturePaymentRequest,
    "CancelPayment": api.CancelPaymentRequest,
    "Refund": api.RefundRequest,
    "ListRefunds": api.ListRefundsRequest,
    "WatchPaymentStatus": api.WatchPaymentStatusRequest,
}
BAD_IDS = ["", "pay_1/../x", "pay-1", "p" * 65]


@pytest.mark.parametrize("rpc", sorted(PAYMENT_ID_REQUESTS))
async def test_payment_id_constraint_is_invalid_argument(stub, app, rpc: str) -> None:
    """Empty, bad characters, too long: every RPC that takes a payment id checks it."""
    for bad in BAD_IDS:
        request = PAYMENT_ID_REQUESTS[rpc](payment_id=bad)
        await _expect_invalid(app, lambda r=request: _call(stub, rpc, r), "payment_id")


OTHER_CASES = [
    pytest.param("GetRefund", api.GetRefundRequest(), "refund_id", id="GetRefund-refund_id-empty"),
    pytest.param(
        "GetRefund",
        api.GetRefundRequest(refund_id="re-1"),
        "refund_id",
        id="GetRefund-refund_id-bad-chars",
    ),
    pytest.param(
        "ListPayments",
        api.ListPaymentsRequest(page_size=-1),
        "page_size",
        id="ListPayments-page_size-negative",
    ),
    pytest.param(
        "ListPayments",
        api.ListPaymentsRequest(status=99),
        "status",
        id="ListPayments-status-unknown",
    ),
    pytest.param(
        "ListPayments",
        api.ListPaymentsRequest(page_token="a" * 513),
        "page_token",
        id="ListPayments-page_token-too-long",
    ),
    pytest.param(
        "ListPayments",
        api.ListPaymentsRequest(order_id="ord 1"),
        "order_id",
        id="ListPayments-order_id-bad-chars",
    ),
    pytest.param(
        "ListPayments",
        api.ListPaymentsRequest(customer_id="c" * 129),
        "customer_id",
        id="ListPayments-customer_id-too-long",
    ),
    pytest.param(
        "ListRefunds",
        api.ListRefundsRequest(payment_id="pay_1", page_size=-5),
        "page_size",
        id="ListRefunds-page_size-negative",
    ),
    pytest.param(
        "ListRefunds",
        api.ListRefundsRequest(payment_id="pay_1", page_token="a" * 513),
        "page_token",
        id="ListRefunds-page_token-too-long",
    ),
    pytest.param(
        "Refund",
        api.RefundRequest(payment_id="pay_1", reason=99),
        "reason",
        id="Refund-reason-unknown",
    ),
    pytest.param(
        "WatchPaymentStatus",
        api.WatchPaymentStatusRequest(payment_id="pay_1", from_sequence=-1),
        "from_sequence",
        id="Watch-from_sequence-negative",
    ),
]


@pytest.mark.parametrize(("rpc", "request_", "field"), OTHER_CASES)
async def test_other_constraint_is_invalid_argument(
    stub, app, rpc: str, request_, field: str
) -> None:
    await _expect_invalid(app, lambda: _call(stub, rpc, request_), field)


async def test_watch_error_comes_when_iterating(stub) -> None:
    stream = stub.WatchPaymentStatus(
        api.WatchPaymentStatusRequest(payment_id="pay_1", from_sequence=-1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert_invalid(RichError(caught.value), "from_sequence")


AMOUNT_CASES = [
    pytest.param(usd(0), "amount", id="zero"),
    pytest.param(usd(-100), r"amount(\.amount_minor)?", id="negative"),
    pytest.param(usd(100, "usd"), "amount.currency", id="currency-lowercase"),
]


@pytest.mark.parametrize(("amount", "field"), AMOUNT_CASES)
async def test_capture_amount_constraint_on_a_real_payment(
    stub, app, amount: pb.Money, field: str
) -> None:
    authorized = await stub.Charge(charge_request(5_000, manual=True))
    payment_id = authorized.payment.payment_id
    request = api.CapturePaymentRequest(payment_id=payment_id, amount=amount)
    await _expect_invalid(app, lambda: stub.CapturePayment(request), field)
    got = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
    assert got.payment == authorized.payment


@pytest.mark.parametrize(("amount", "field"), AMOUNT_CASES)
async def test_refund_amount_constraint_on_a_real_payment(
    stub, app, amount: pb.Money, field: str
) -> None:
    captured = await stub.Charge(charge_request(5_000))
    payment_id = captured.payment.payment_id
    request = api.RefundRequest(payment_id=payment_id, amount=amount)
    await _expect_invalid(app, lambda: stub.Refund(request), field)
    got = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
    assert got.payment == captured.payment


# --- page tokens ---------------------------------------------------------------------


def assert_invalid_page_token(error: RichError) -> None:
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, (error.code, error.message)
    assert error.info.reason == "INVALID_PAGE_TOKEN"
    assert error.info.domain == "payments.v1"


MALFORMED_TOKENS = {
    "garbage": "garbage",
    "not-base64": "!!!!",
    "non-ascii": "t\u00e9st",
    "json-list": base64.urlsafe_b64encode(b"[1, 2]").decode(),
    "json-missing-keys": base64.urlsafe_b64encode(b'{"x": 1}').decode(),
}


@pytest.mark.parametrize("token", sorted(MALFORMED_TOKENS))
async def test_malformed_page_token_is_rejected(stub, app, token: str) -> None:
    payment = (await stub.Charge(charge_request())).payment
    before = await row_counts(app)
    calls = [
        stub.ListPayments(api.ListPaymentsRequest(page_token=MALFORMED_TOKENS[token])),
        stub.ListRefunds(
            api.ListRefundsRequest(
                payment_id=payment.payment_id, page_token=MALFORMED_TOKENS[token]
            )
        ),
    ]
    for call in calls:
        assert_invalid_page_token(await rpc_error(call))
    assert await row_counts(app) == before


async def _customer_token(stub: Any, customer: str) -> str:
    for _ in range(2):
        await stub.Charge(charge_request(customer_id=customer))
    page = await stub.ListPayments(api.ListPaymentsRequest(customer_id=customer, page_size=1))
    assert page.next_page_token
    return page.next_page_token


OTHER_FILTERS = {
    "other-customer": {"customer_id": "cus_other"},
    "no-filter": {},
    "extra-order": {"customer_id": "cus_a", "order_id": "ord_x"},
    "extra-status": {"customer_id": "cus_a", "status": pb.PAYMENT_STATUS_CAPTURED},
}


@pytest.mark.parametrize("other", sorted(OTHER_FILTERS))
async def test_payments_token_is_bound_to_its_filter(stub, other: str) -> None:
    token = await _customer_token(stub, "cus_a")
    request = api.ListPaymentsRequest(page_token=token, **OTHER_FILTERS[other])
    assert_invalid_page_token(await rpc_error(stub.ListPayments(request)))
    # The same filter (even with another page size) still accepts it.
    same = await stub.ListPayments(
        api.ListPaymentsRequest(customer_id="cus_a", page_token=token, page_size=5)
    )
    assert len(same.payments) == 1


async def test_refunds_token_is_bound_to_its_payment(stub) -> None:
    first = (await stub.Charge(charge_request(3_000))).payment.payment_id
    second = (await stub.Charge(charge_request(3_000))).payment.payment_id
    for _ in range(2):
        await stub.Refund(api.RefundRequest(payment_id=first, amount=usd(100)))
    page = await stub.ListRefunds(api.ListRefundsRequest(payment_id=first, page_size=1))
    assert page.next_page_token
    request = api.ListRefundsRequest(payment_id=second, page_token=page.next_page_token)
    assert_invalid_page_token(await rpc_error(stub.ListRefunds(request)))
    assert_invalid_page_token(
        await rpc_error(stub.ListPayments(api.ListPaymentsRequest(page_token=page.next_page_token)))
    )


def _retime(token: str, when: str) -> str:
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    body["t"] = when
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "when",
    [
        pytest.param("2020-01-01T00:00:00", id="naive-time"),
        pytest.param("0001-01-01T00:00:00+05:00", id="out-of-range-time"),
    ],
)
async def test_tampered_page_token_is_invalid_not_internal(stub, when: str) -> None:
    """The token is opaque but not signed: a client that edits it gets INVALID_PAGE_TOKEN."""
    token = _retime(await _customer_token(stub, "cus_t"), when)
    error = await rpc_error(
        stub.ListPayments(api.ListPaymentsRequest(customer_id="cus_t", page_token=token))
    )
    assert_invalid_page_token(error)


async def test_free_text_keeps_tabs_newlines_and_unicode(stub) -> None:
    text = "Order 42\tpaid\r\nthanks \u00e9\U0001f4b8"
    reply = await stub.Charge(_charge(description=text, metadata={"note": text}))
    assert (reply.payment.description, reply.payment.metadata["note"]) == (text, text)


async def test_a_huge_map_key_is_cut_in_the_error_not_echoed_whole(stub, app) -> None:
    error = await _expect_invalid(
        app, lambda: stub.Charge(_metadata({"k" * 10_000: "v"})), r"metadata\[.*\]"
    )
    assert len(error.message) < 200, error.message
    assert all(len(f) < 100 for f in error.fields), error.fields


@pytest.mark.parametrize("data", [b"\x00", b"\xff" * 16, b"\x0a\x02\xff\xfe"])
async def test_undecodable_request_bytes_are_invalid_argument(channel, app, data: bytes) -> None:
    raw_charge = channel.unary_unary(
        "/payments.v1.PaymentService/Charge", request_serializer=None, response_deserializer=None
    )
    before = await row_counts(app)
    error = await rpc_error(raw_charge(data))
    assert (error.code, error.info.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    ), error.message
    assert await row_counts(app) == before
