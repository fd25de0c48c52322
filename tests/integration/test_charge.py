"""Charge through the generated stub against a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from tests.helpers.builders import S, card, charge_request, order_id
from tests.helpers.calls import rpc_error
from tests.helpers.db import events_of

DECLINES = {
    "tok_chargeDeclined": ("card_declined", "generic_decline"),
    "tok_chargeDeclinedInsufficientFunds": ("card_declined", "insufficient_funds"),
    "tok_chargeDeclinedExpiredCard": ("expired_card", "expired_card"),
    "tok_chargeDeclinedProcessingError": ("processing_error", ""),
}


@pytest.mark.parametrize(
    ("token", "brand", "last4"),
    [("tok_visa", "visa", "4242"), ("tok_mastercard", "mastercard", "4444")],
)
async def test_approved_card_is_captured(stub, app, token: str, brand: str, last4: str) -> None:
    reply = await stub.Charge(charge_request(2_500, card(token), customer_id="cus_1"))
    payment = reply.payment
    assert payment.status == S.PAYMENT_STATUS_CAPTURED
    assert payment.captured_amount.amount_minor == 2_500
    assert payment.refunded_amount.amount_minor == 0
    assert payment.payment_method.card.brand == brand
    assert payment.payment_method.card.last4 == last4
    assert payment.gateway_reference.startswith("ch_sim_")
    assert payment.payment_id.startswith("pay_")
    assert await events_of(app, payment.payment_id) == [
        (1, None, "PENDING"),
        (2, "PENDING", "PROCESSING"),
        (3, "PROCESSING", "CAPTURED"),
    ]
    assert payment.sequence == 3


@pytest.mark.parametrize("token", sorted(DECLINES))
async def test_decline_is_ok_with_failed_payment(stub, token: str) -> None:
    reply = await stub.Charge(charge_request(1_000, card(token)))
    code, decline_code = DECLINES[token]
    assert reply.payment.status == S.PAYMENT_STATUS_FAILED
    assert reply.payment.failure.code == code
    assert reply.payment.failure.decline_code == decline_code
    assert reply.payment.failure.message
    assert reply.payment.captured_amount.amount_minor == 0


async def test_declined_order_can_be_charged_again(stub) -> None:
    order = order_id()
    declined = await stub.Charge(charge_request(order_id=order, method=card("tok_chargeDeclined")))
    retried = await stub.Charge(charge_request(order_id=order))
    assert declined.payment.status == S.PAYMENT_STATUS_FAILED
    assert retried.payment.status == S.PAYMENT_STATUS_CAPTURED
    assert retried.payment.payment_id != declined.payment.payment_id


async def test_live_payment_blocks_a_second_charge(stub) -> None:
    order = order_id()
    first = await stub.Charge(charge_request(order_id=order))
    error = await rpc_error(stub.Charge(charge_request(order_id=order)))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.info.reason == "ORDER_HAS_ACTIVE_PAYMENT"
    assert error.info.domain == "payments.v1"
    assert error.info.metadata["paymentId"] == first.payment.payment_id


async def test_cod_authorizes_and_is_captured_on_delivery(stub) -> None:
    reply = await stub.Charge(charge_request(4_000, pb.PaymentMethod(cod=pb.CodMethod())))
    assert reply.payment.status == S.PAYMENT_STATUS_AUTHORIZED
    assert reply.payment.payment_method.type == pb.PAYMENT_METHOD_TYPE_COD
    captured = await stub.CapturePayment(
        api.CapturePaymentRequest(payment_id=reply.payment.payment_id)
    )
    assert captured.payment.status == S.PAYMENT_STATUS_CAPTURED
    assert captured.payment.captured_amount.amount_minor == 4_000


async def test_wallet_charges_synchronously(stub) -> None:
    method = pb.PaymentMethod(wallet=pb.WalletMethod(provider="apple_pay", token="wtok_1"))
    reply = await stub.Charge(charge_request(1_500, method))
    assert reply.payment.status in {S.PAYMENT_STATUS_CAPTURED, S.PAYMENT_STATUS_FAILED}
    assert reply.payment.payment_method.wallet_provider == "apple_pay"


ASYNC_METHODS = {
    "upi": pb.PaymentMethod(upi=pb.UpiMethod(vpa="alice@okbank")),
    "net_banking": pb.PaymentMethod(net_banking=pb.NetBankingMethod(bank_code="HDFC")),
    "paypal": pb.PaymentMethod(paypal=pb.PaypalMethod(payer_token="EC-123")),
}


@pytest.mark.parametrize("kind", sorted(ASYNC_METHODS))
async def test_async_methods_stay_processing_then_settle(stub, kind: str) -> None:
    reply = await stub.Charge(charge_request(3_000, ASYNC_METHODS[kind]))
    assert reply.payment.status == S.PAYMENT_STATUS_PROCESSING
    statuses = [
        item.event.status
        async for item in stub.WatchPaymentStatus(
            api.WatchPaymentStatusRequest(payment_id=reply.payment.payment_id)
        )
    ]
    assert statuses[0] == S.PAYMENT_STATUS_PROCESSING
    assert statuses[-1] in {S.PAYMENT_STATUS_CAPTURED, S.PAYMENT_STATUS_FAILED}


async def test_zero_decimal_and_three_decimal_currencies(stub) -> None:
    yen = await stub.Charge(charge_request(500, currency="JPY"))
    dinar = await stub.Charge(charge_request(1_250, currency="KWD"))
    assert (yen.payment.amount.currency, yen.payment.amount.amount_minor) == ("JPY", 500)
    assert (dinar.payment.amount.currency, dinar.payment.amount.amount_minor) == ("KWD", 1_250)
