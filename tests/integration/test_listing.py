"""Reads through the generated stub: GetPayment, ListPayments (newest first, AIP-158
pages and filters), GetRefund and ListRefunds (oldest first), on SQLite and PostgreSQL."""

from __future__ import annotations

import pathlib
from typing import Any

import grpc
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from payment_grpc.bootstrap import build_application
from tests.conftest import make_settings
from tests.helpers.builders import S, card, charge_request, order_id, usd
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata


async def _charge(stub: Any, n: int, **fields: Any) -> list[pb.Payment]:
    """n payments, created one after another (oldest first)."""
    return [(await stub.Charge(charge_request(1_000 + i, **fields))).payment for i in range(n)]


async def _walk(stub: Any, **request: Any) -> list[list[pb.Payment]]:
    pages, token = [], ""
    while True:
        page = await stub.ListPayments(api.ListPaymentsRequest(page_token=token, **request))
        pages.append(list(page.payments))
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 20, "pagination does not end"


def _ids(payments: list[pb.Payment]) -> list[str]:
    return [p.payment_id for p in payments]


async def test_list_payments_newest_first(stub) -> None:
    created = await _charge(stub, 3)
    page = await stub.ListPayments(api.ListPaymentsRequest())
    assert _ids(page.payments) == _ids(created)[::-1]
    assert list(page.payments) == created[::-1]
    times = [p.create_time.ToDatetime() for p in page.payments]
    assert times == sorted(times, reverse=True)
    assert page.next_page_token == ""


async def test_pagination_walks_every_payment_once(stub) -> None:
    created = await _charge(stub, 5)
    pages = await _walk(stub, page_size=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    walked = [p for page in pages for p in page]
    assert _ids(walked) == _ids(created)[::-1]
    assert len(set(_ids(walked))) == 5


async def test_exact_multiple_of_page_size_has_no_empty_last_page(stub) -> None:
    created = await _charge(stub, 4)
    pages = await _walk(stub, page_size=2)
    assert [len(p) for p in pages] == [2, 2]
    assert _ids([p for page in pages for p in page]) == _ids(created)[::-1]


async def test_page_size_may_change_between_pages(stub) -> None:
    created = await _charge(stub, 5)
    first = await stub.ListPayments(api.ListPaymentsRequest(page_size=2))
    rest = await stub.ListPayments(
        api.ListPaymentsRequest(page_size=10, page_token=first.next_page_token)
    )
    assert _ids([*first.payments, *rest.payments]) == _ids(created)[::-1]
    assert rest.next_page_token == ""


async def test_page_size_zero_means_default(stub) -> None:
    created = await _charge(stub, 3)
    page = await stub.ListPayments(api.ListPaymentsRequest(page_size=0))
    assert _ids(page.payments) == _ids(created)[::-1]
    assert page.next_page_token == ""


async def test_large_page_size_is_accepted(stub) -> None:
    created = await _charge(stub, 3)
    for page_size in (1_000, 1_001, 2**31 - 1):
        page = await stub.ListPayments(api.ListPaymentsRequest(page_size=page_size))
        assert _ids(page.payments) == _ids(created)[::-1], page_size
        assert page.next_page_token == ""


async def test_empty_database_lists_nothing(stub) -> None:
    page = await stub.ListPayments(api.ListPaymentsRequest())
    assert list(page.payments) == []
    assert page.next_page_token == ""


async def test_filter_by_order_id(stub) -> None:
    order = order_id()
    declined = (
        await stub.Charge(charge_request(order_id=order, method=card("tok_chargeDeclined")))
    ).payment
    retried = (await stub.Charge(charge_request(order_id=order))).payment
    await _charge(stub, 2)
    page = await stub.ListPayments(api.ListPaymentsRequest(order_id=order))
    assert _ids(page.payments) == [retried.payment_id, declined.payment_id]
    assert {p.order_id for p in page.payments} == {order}
    none = await stub.ListPayments(api.ListPaymentsRequest(order_id=order_id()))
    assert list(none.payments) == []


async def test_filter_by_customer_id_paginates(stub) -> None:
    mine = await _charge(stub, 3, customer_id="cus_mine")
    await _charge(stub, 2, customer_id="cus_other")
    await _charge(stub, 1)
    pages = await _walk(stub, customer_id="cus_mine", page_size=2)
    assert [len(p) for p in pages] == [2, 1]
    walked = [p for page in pages for p in page]
    assert _ids(walked) == _ids(mine)[::-1]
    assert {p.customer_id for p in walked} == {"cus_mine"}


async def test_filter_by_status(stub) -> None:
    failed = (await stub.Charge(charge_request(method=card("tok_chargeDeclined")))).payment
    captured = (await stub.Charge(charge_request())).payment
    authorized = (await stub.Charge(charge_request(manual=True))).payment
    assert failed.status == S.PAYMENT_STATUS_FAILED
    expected = {
        S.PAYMENT_STATUS_FAILED: [failed.payment_id],
        S.PAYMENT_STATUS_CAPTURED: [captured.payment_id],
        S.PAYMENT_STATUS_AUTHORIZED: [authorized.payment_id],
        S.PAYMENT_STATUS_REFUNDED: [],
    }
    for status, ids in expected.items():
        page = await stub.ListPayments(api.ListPaymentsRequest(status=status))
        assert _ids(page.payments) == ids, S.Name(status)


async def test_filters_combine(stub) -> None:
    failed = (
        await stub.Charge(charge_request(customer_id="cus_x", method=card("tok_chargeDeclined")))
    ).payment
    await stub.Charge(charge_request(customer_id="cus_x"))
    await stub.Charge(charge_request(customer_id="cus_y", method=card("tok_chargeDeclined")))
    page = await stub.ListPayments(
        api.ListPaymentsRequest(customer_id="cus_x", status=S.PAYMENT_STATUS_FAILED)
    )
    assert _ids(page.payments) == [failed.payment_id]


async def test_get_payment_returns_what_charge_returned(stub) -> None:
    charged = (
        await stub.Charge(
            charge_request(
                2_345,
                customer_id="cus_get",
                description="two tickets",
                metadata={"cart": "c_1", "channel": "web"},
            )
        )
    ).payment
    got = await stub.GetPayment(api.GetPaymentRequest(payment_id=charged.payment_id))
    assert got.payment == charged
    assert dict(got.payment.metadata) == {"cart": "c_1", "channel": "web"}
    assert got.payment.description == "two tickets"


async def test_get_payment_of_a_declined_charge_keeps_the_failure(stub) -> None:
    charged = (await stub.Charge(charge_request(method=card("tok_chargeDeclined")))).payment
    got = await stub.GetPayment(api.GetPaymentRequest(payment_id=charged.payment_id))
    assert got.payment == charged
    assert got.payment.failure.code == "card_declined"


async def test_get_unknown_payment_is_not_found(stub) -> None:
    error = await rpc_error(stub.GetPayment(api.GetPaymentRequest(payment_id="pay_doesnotexist")))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info.reason == "PAYMENT_NOT_FOUND"
    assert error.info.domain == "payments.v1"
    assert error.info.metadata["paymentId"] == "pay_doesnotexist"


async def _refunded(stub: Any, amounts: list[int]) -> tuple[str, list[pb.Refund]]:
    payment = (await stub.Charge(charge_request(10_000))).payment
    refunds = []
    for amount in amounts:
        reply = await stub.Refund(
            api.RefundRequest(payment_id=payment.payment_id, amount=usd(amount))
        )
        refunds.append(reply.refund)
    return payment.payment_id, refunds


async def test_list_refunds_oldest_first_and_paginates(stub) -> None:
    payment_id, refunds = await _refunded(stub, [1_000, 2_000, 3_000])
    await _refunded(stub, [500])  # another payment's refund never shows up
    first = await stub.ListRefunds(api.ListRefundsRequest(payment_id=payment_id, page_size=2))
    assert list(first.refunds) == refunds[:2]
    assert first.next_page_token
    second = await stub.ListRefunds(
        api.ListRefundsRequest(payment_id=payment_id, page_size=2, page_token=first.next_page_token)
    )
    assert list(second.refunds) == refunds[2:]
    assert second.next_page_token == ""
    everything = await stub.ListRefunds(api.ListRefundsRequest(payment_id=payment_id))
    assert [r.amount.amount_minor for r in everything.refunds] == [1_000, 2_000, 3_000]
    assert everything.next_page_token == ""


async def test_list_refunds_of_a_payment_without_refunds_is_empty(stub) -> None:
    payment = (await stub.Charge(charge_request())).payment
    page = await stub.ListRefunds(api.ListRefundsRequest(payment_id=payment.payment_id))
    assert list(page.refunds) == []
    assert page.next_page_token == ""


async def test_list_refunds_of_unknown_payment_is_not_found(stub) -> None:
    error = await rpc_error(stub.ListRefunds(api.ListRefundsRequest(payment_id="pay_doesnotexist")))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info.reason == "PAYMENT_NOT_FOUND"
    assert error.info.domain == "payments.v1"


async def test_get_refund_returns_the_refund(stub) -> None:
    payment = (await stub.Charge(charge_request(5_000))).payment
    reply = await stub.Refund(
        api.RefundRequest(
            payment_id=payment.payment_id,
            amount=usd(1_200),
            reason=pb.REFUND_REASON_REQUESTED_BY_CUSTOMER,
        )
    )
    refund = reply.refund
    assert refund.refund_id.startswith("re_")
    assert refund.status == pb.REFUND_STATUS_SUCCEEDED
    got = await stub.GetRefund(api.GetRefundRequest(refund_id=refund.refund_id))
    assert got.refund == refund
    assert got.refund.payment_id == payment.payment_id
    assert got.refund.amount == usd(1_200)
    assert got.refund.reason == pb.REFUND_REASON_REQUESTED_BY_CUSTOMER
    assert reply.payment.status == S.PAYMENT_STATUS_PARTIALLY_REFUNDED
    assert reply.payment.refunded_amount.amount_minor == 1_200


async def test_get_unknown_refund_is_not_found(stub) -> None:
    error = await rpc_error(stub.GetRefund(api.GetRefundRequest(refund_id="re_doesnotexist")))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info.reason == "REFUND_NOT_FOUND"
    assert error.info.domain == "payments.v1"
    assert error.info.metadata["refundId"] == "re_doesnotexist"


async def test_a_page_stops_before_the_message_limit_and_the_rest_follows(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """Big payments (4-byte characters in every free-text field) and page_size 1000: each
    page fits the server's send limit; none is refused as too large; all are walked once."""
    limit = 32 * 1024
    app = build_application(make_settings(database_url, tmp_path, max_message_bytes=limit))
    await app.start()
    try:
        async with aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata()
        ) as channel:
            stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
            wide = {f"note{i}": "\U0001f4b8" * 500 for i in range(3)}
            created = await _charge(stub, 12, description="\U0001f4b8" * 500, metadata=wide)
            assert sum(p.ByteSize() for p in created) > 2 * limit
            pages, token = [], ""
            while True:
                reply = await stub.ListPayments(
                    api.ListPaymentsRequest(page_size=1000, page_token=token)
                )
                assert reply.ByteSize() <= limit
                pages.append(list(reply.payments))
                token = reply.next_page_token
                if not token:
                    break
            assert len(pages) > 2
            assert all(pages)
            assert _ids([p for page in pages for p in page]) == _ids(created)[::-1]
    finally:
        await app.stop()
