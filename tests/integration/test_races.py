"""Concurrency: refunds never exceed the captured amount, capture and cancel never both win."""

from __future__ import annotations

import asyncio

import grpc
from payments.v1 import payment_service_pb2 as api

from tests.helpers.builders import S, charge_request, usd
from tests.helpers.db import events_of


async def _outcomes(calls):  # type: ignore[no-untyped-def]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    wins = [a for a in answers if not isinstance(a, BaseException)]
    losses = [a for a in answers if isinstance(a, BaseException)]
    for loss in losses:
        assert isinstance(loss, grpc.aio.AioRpcError), loss
        assert loss.code() in {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED}
    return wins, losses


async def test_two_refunds_of_sixty_on_a_hundred_one_wins(stub, app) -> None:
    payment = (await stub.Charge(charge_request(100))).payment
    refund = api.RefundRequest(payment_id=payment.payment_id, amount=usd(60))
    wins, losses = await _outcomes([stub.Refund(refund) for _ in range(2)])
    assert len(wins) == 1
    assert losses[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    after = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment.payment_id))
    assert after.payment.refunded_amount.amount_minor == 60


async def test_twenty_refunds_of_ten_on_a_hundred_exactly_ten_win(stub, app) -> None:
    payment = (await stub.Charge(charge_request(100))).payment
    refund = api.RefundRequest(payment_id=payment.payment_id, amount=usd(10))
    wins, _ = await _outcomes([stub.Refund(refund) for _ in range(20)])
    assert len(wins) == 10
    after = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment.payment_id))
    assert after.payment.refunded_amount.amount_minor == 100
    assert after.payment.status == S.PAYMENT_STATUS_REFUNDED
    events = await events_of(app, payment.payment_id)
    assert [e[0] for e in events] == list(range(1, len(events) + 1))
    assert len(events) == 3 + 10


async def test_capture_racing_cancel_exactly_one_wins(stub, app) -> None:
    for _ in range(5):
        payment = (await stub.Charge(charge_request(5_000, manual=True))).payment
        pid = payment.payment_id
        wins, losses = await _outcomes(
            [
                stub.CapturePayment(api.CapturePaymentRequest(payment_id=pid)),
                stub.CancelPayment(api.CancelPaymentRequest(payment_id=pid)),
            ]
        )
        assert len(wins) == 1
        assert len(losses) == 1
        final = (await stub.GetPayment(api.GetPaymentRequest(payment_id=pid))).payment
        assert final.status == wins[0].payment.status
        assert final.status in {S.PAYMENT_STATUS_CAPTURED, S.PAYMENT_STATUS_CANCELED}
        captured = 5_000 if final.status == S.PAYMENT_STATUS_CAPTURED else 0
        assert final.captured_amount.amount_minor == captured
        assert len(await events_of(app, pid)) == 4
