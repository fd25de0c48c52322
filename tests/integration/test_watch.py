"""WatchPaymentStatus: snapshot, every change in order, resume, end, and clean-up."""

from __future__ import annotations

import grpc
from grpc import aio
from payments.v1 import payment_service_pb2 as api

from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.api import convert
from payment_grpc.api.methods import payment_method
from payment_grpc.bootstrap import Application, build_cipher
from tests.helpers.builders import S, charge_request, usd
from tests.helpers.calls import rpc_error


def _watch(stub, payment_id: str, **fields):  # type: ignore[no-untyped-def]
    return stub.WatchPaymentStatus(api.WatchPaymentStatusRequest(payment_id=payment_id, **fields))


async def test_settled_payment_sends_its_snapshot_and_ends(stub) -> None:
    payment = (await stub.Charge(charge_request())).payment
    events = [m.event async for m in _watch(stub, payment.payment_id)]
    assert [(e.sequence, e.previous_status, e.status) for e in events] == [
        (3, S.PAYMENT_STATUS_PROCESSING, S.PAYMENT_STATUS_CAPTURED)
    ]
    assert events[0].captured_amount.amount_minor == payment.amount.amount_minor


async def test_follows_capture_and_refunds_to_the_end(stub) -> None:
    payment = (await stub.Charge(charge_request(10_000, manual=True))).payment
    call = _watch(stub, payment.payment_id, follow_refunds=True)
    snapshot = (await call.read()).event
    assert (snapshot.sequence, snapshot.status) == (3, S.PAYMENT_STATUS_AUTHORIZED)

    await stub.CapturePayment(api.CapturePaymentRequest(payment_id=payment.payment_id))
    captured = (await call.read()).event
    assert (captured.sequence, captured.status) == (4, S.PAYMENT_STATUS_CAPTURED)

    await stub.Refund(api.RefundRequest(payment_id=payment.payment_id, amount=usd(4_000)))
    partial = (await call.read()).event
    assert (partial.sequence, partial.status) == (5, S.PAYMENT_STATUS_PARTIALLY_REFUNDED)
    assert partial.refunded_amount.amount_minor == 4_000

    await stub.Refund(api.RefundRequest(payment_id=payment.payment_id))
    done = (await call.read()).event
    assert (done.sequence, done.previous_status, done.status) == (
        6, S.PAYMENT_STATUS_PARTIALLY_REFUNDED, S.PAYMENT_STATUS_REFUNDED,
    )  # fmt: skip
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_without_follow_refunds_the_stream_ends_at_capture(stub) -> None:
    payment = (await stub.Charge(charge_request(manual=True))).payment
    call = _watch(stub, payment.payment_id)
    assert (await call.read()).event.status == S.PAYMENT_STATUS_AUTHORIZED
    await stub.CapturePayment(api.CapturePaymentRequest(payment_id=payment.payment_id))
    assert (await call.read()).event.status == S.PAYMENT_STATUS_CAPTURED
    assert await call.read() == grpc.aio.EOF


async def test_resume_sends_only_later_events_without_snapshot(stub) -> None:
    payment = (await stub.Charge(charge_request())).payment
    events = [m.event async for m in _watch(stub, payment.payment_id, from_sequence=1)]
    assert [(e.sequence, e.status) for e in events] == [
        (2, S.PAYMENT_STATUS_PROCESSING),
        (3, S.PAYMENT_STATUS_CAPTURED),
    ]


async def test_resume_after_the_last_event_of_a_final_payment_ends_at_once(stub) -> None:
    payment = (await stub.Charge(charge_request())).payment
    events = [m async for m in _watch(stub, payment.payment_id, from_sequence=3)]
    assert events == []


async def test_unknown_payment_is_not_found(stub) -> None:
    error = await rpc_error(_watch(stub, "pay_missing").read())
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info.reason == "PAYMENT_NOT_FOUND"


async def test_vanished_watcher_is_released_and_writers_go_on(stub, app) -> None:
    payment = (await stub.Charge(charge_request(manual=True))).payment
    call = _watch(stub, payment.payment_id)
    await call.read()
    assert app.bus.watcher_count() == 1
    call.cancel()
    released = await app.bus.wait_until_idle()
    assert released
    reply = await stub.CapturePayment(api.CapturePaymentRequest(payment_id=payment.payment_id))
    assert reply.payment.status == S.PAYMENT_STATUS_CAPTURED


async def test_every_watcher_gets_each_event_as_grpc_encoded_it_before(
    app: Application, channel: aio.Channel, stub
) -> None:
    """An event is encoded once for all its watchers and sent as bytes: on the wire each
    watcher gets exactly what gRPC's serializer made of the message, byte for byte."""
    payment = (await stub.Charge(charge_request(manual=True))).payment
    raw_watch = channel.unary_stream(
        payment_method("WatchPaymentStatus"),
        request_serializer=api.WatchPaymentStatusRequest.SerializeToString,
        response_deserializer=None,  # the bytes as they came
    )
    request = api.WatchPaymentStatusRequest(payment_id=payment.payment_id)
    calls = [raw_watch(request) for _ in range(3)]
    snapshots = [await call.read() for call in calls]
    await stub.CapturePayment(api.CapturePaymentRequest(payment_id=payment.payment_id))
    captures = [await call.read() for call in calls]
    for call in calls:
        assert await call.read() == aio.EOF

    uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))
    async with uow(read_only=True) as tx:
        authorized, captured = await tx.payments.events_after(payment.payment_id, 2, 10)
    expected = [
        api.WatchPaymentStatusResponse.SerializeToString(  # the method's serializer
            api.WatchPaymentStatusResponse(event=convert.event_to_pb(event))
        )
        for event in (authorized, captured)
    ]
    assert snapshots == [expected[0]] * 3
    assert captures == [expected[1]] * 3
    assert api.WatchPaymentStatusResponse.FromString(captures[0]).event.status == (
        S.PAYMENT_STATUS_CAPTURED
    )
