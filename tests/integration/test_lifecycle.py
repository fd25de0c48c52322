"""Capture, cancel and refund through the state machine, and every illegal move."""

from __future__ import annotations

import grpc
import pytest
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from tests.helpers.builders import S, card, charge_request, usd
from tests.helpers.calls import rpc_error
from tests.helpers.db import events_of


async def _authorized(stub, amount: int = 10_000) -> pb.Payment:
    reply = await stub.Charge(charge_request(amount, manual=True))
    assert reply.payment.status == S.PAYMENT_STATUS_AUTHORIZED
    assert reply.payment.captured_amount.amount_minor == 0
    return reply.payment


async def _captured(stub, amount: int = 10_000) -> pb.Payment:
    reply = await stub.Charge(charge_request(amount))
    assert reply.payment.status == S.PAYMENT_STATUS_CAPTURED
    return reply.payment


async def _failed(stub) -> pb.Payment:
    return (await stub.Charge(charge_request(method=card("tok_chargeDeclined")))).payment


async def _canceled(stub) -> pb.Payment:
    payment = await _authorized(stub)
    return (
        await stub.CancelPayment(api.CancelPaymentRequest(payment_id=payment.payment_id))
    ).payment


async def _refunded(stub) -> pb.Payment:
    payment = await _captured(stub)
    return (await stub.Refund(api.RefundRequest(payment_id=payment.payment_id))).payment


async def test_manual_capture_of_the_whole_amount(stub, app) -> None:
    payment = await _authorized(stub)
    reply = await stub.CapturePayment(api.CapturePaymentRequest(payment_id=payment.payment_id))
    assert reply.payment.status == S.PAYMENT_STATUS_CAPTURED
    assert reply.payment.captured_amount.amount_minor == 10_000
    assert [e[2] for e in await events_of(app, payment.payment_id)] == [
        "PENDING", "PROCESSING", "AUTHORIZED", "CAPTURED",
    ]  # fmt: skip


async def test_partial_capture_then_refund_is_bounded_by_captured(stub) -> None:
    payment = await _authorized(stub)
    captured = await stub.CapturePayment(
        api.CapturePaymentRequest(payment_id=payment.payment_id, amount=usd(6_000))
    )
    assert captured.payment.captured_amount.amount_minor == 6_000
    assert captured.payment.amount.amount_minor == 10_000
    error = await rpc_error(
        stub.Refund(api.RefundRequest(payment_id=payment.payment_id, amount=usd(6_001)))
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "REFUND_EXCEEDS_AVAILABLE"
    assert error.info.metadata["availableAmountMinor"] == "6000"


async def test_capture_above_authorized_is_rejected(stub) -> None:
    payment = await _authorized(stub, 1_000)
    error = await rpc_error(
        stub.CapturePayment(
            api.CapturePaymentRequest(payment_id=payment.payment_id, amount=usd(1_001))
        )
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "CAPTURE_EXCEEDS_AUTHORIZED"


async def test_capture_in_another_currency_is_invalid(stub) -> None:
    payment = await _authorized(stub, 1_000)
    error = await rpc_error(
        stub.CapturePayment(
            api.CapturePaymentRequest(payment_id=payment.payment_id, amount=usd(500, "EUR"))
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "CURRENCY_MISMATCH"


async def test_cancel_an_authorization(stub, app) -> None:
    payment = await _authorized(stub)
    reply = await stub.CancelPayment(api.CancelPaymentRequest(payment_id=payment.payment_id))
    assert reply.payment.status == S.PAYMENT_STATUS_CANCELED
    assert (await events_of(app, payment.payment_id))[-1] == (4, "AUTHORIZED", "CANCELED")


async def test_canceled_order_can_be_charged_again(stub) -> None:
    payment = await _canceled(stub)
    again = await stub.Charge(charge_request(order_id=payment.order_id))
    assert again.payment.status == S.PAYMENT_STATUS_CAPTURED


async def test_partial_refunds_then_full_remainder(stub, app) -> None:
    payment = await _captured(stub, 10_000)
    first = await stub.Refund(
        api.RefundRequest(
            payment_id=payment.payment_id,
            amount=usd(2_500),
            reason=pb.REFUND_REASON_REQUESTED_BY_CUSTOMER,
        )
    )
    assert first.refund.status == pb.REFUND_STATUS_SUCCEEDED
    assert first.refund.reason == pb.REFUND_REASON_REQUESTED_BY_CUSTOMER
    assert first.payment.status == S.PAYMENT_STATUS_PARTIALLY_REFUNDED
    second = await stub.Refund(api.RefundRequest(payment_id=payment.payment_id, amount=usd(2_500)))
    assert second.payment.refunded_amount.amount_minor == 5_000
    assert second.payment.status == S.PAYMENT_STATUS_PARTIALLY_REFUNDED
    rest = await stub.Refund(api.RefundRequest(payment_id=payment.payment_id))
    assert rest.refund.amount.amount_minor == 5_000
    assert rest.payment.status == S.PAYMENT_STATUS_REFUNDED
    assert rest.payment.refunded_amount.amount_minor == 10_000
    statuses = [e[2] for e in await events_of(app, payment.payment_id)]
    assert statuses[-3:] == ["PARTIALLY_REFUNDED", "PARTIALLY_REFUNDED", "REFUNDED"]
    listed = await stub.ListRefunds(api.ListRefundsRequest(payment_id=payment.payment_id))
    assert [r.amount.amount_minor for r in listed.refunds] == [2_500, 2_500, 5_000]


async def test_over_refund_is_rejected_and_changes_nothing(stub) -> None:
    payment = await _captured(stub, 1_000)
    error = await rpc_error(
        stub.Refund(api.RefundRequest(payment_id=payment.payment_id, amount=usd(1_001)))
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "REFUND_EXCEEDS_AVAILABLE"
    after = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment.payment_id))
    assert after.payment.refunded_amount.amount_minor == 0
    assert after.payment.sequence == payment.sequence
    listed = await stub.ListRefunds(api.ListRefundsRequest(payment_id=payment.payment_id))
    assert list(listed.refunds) == []


STATES = {
    "AUTHORIZED": _authorized,
    "CAPTURED": _captured,
    "FAILED": _failed,
    "CANCELED": _canceled,
    "REFUNDED": _refunded,
}
ALLOWED = {
    ("AUTHORIZED", "capture"), ("AUTHORIZED", "cancel"),
    ("CAPTURED", "refund"),
}  # fmt: skip


def _operation(name: str, payment_id: str):  # type: ignore[no-untyped-def]
    return {
        "capture": lambda stub: stub.CapturePayment(
            api.CapturePaymentRequest(payment_id=payment_id)
        ),
        "cancel": lambda stub: stub.CancelPayment(api.CancelPaymentRequest(payment_id=payment_id)),
        "refund": lambda stub: stub.Refund(api.RefundRequest(payment_id=payment_id)),
    }[name]


@pytest.mark.parametrize(
    ("state", "operation"),
    [(s, o) for s in STATES for o in ("capture", "cancel", "refund") if (s, o) not in ALLOWED],
)
async def test_illegal_transition_is_failed_precondition(stub, state: str, operation: str) -> None:
    payment = await STATES[state](stub)
    error = await rpc_error(_operation(operation, payment.payment_id)(stub))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info.reason == "PAYMENT_UNEXPECTED_STATE"
    assert error.info.domain == "payments.v1"
    assert error.info.metadata["currentStatus"] == state
    after = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment.payment_id))
    assert after.payment == payment


@pytest.mark.parametrize("operation", ["capture", "cancel", "refund"])
async def test_operations_on_unknown_payment_are_not_found(stub, operation: str) -> None:
    error = await rpc_error(_operation(operation, "pay_unknown")(stub))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info.reason == "PAYMENT_NOT_FOUND"
