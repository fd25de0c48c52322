"""An authorization held longer than AUTHORIZATION_HOLD_HOURS is voided at the gateway and
CANCELED with reason EXPIRED by the recovery worker (on the payment, its event and the
event envelope the outbox and the feed carry); other payments are left alone. A caller's
cancel is REQUESTED."""

from __future__ import annotations

import pathlib

import pytest
import sqlalchemy as sa
from payments.v1 import events_pb2, payment_service_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.db.tables import payment_feed, payments
from payment_grpc.adapters.gateways.simulated import SimulatedGateway
from payment_grpc.bootstrap import Application
from payment_grpc.config import Settings
from tests.conftest import make_settings
from tests.helpers.builders import S, charge_request
from tests.helpers.db import events_of


@pytest.fixture
def settings(database_url: str, tmp_path: pathlib.Path) -> Settings:
    # A hold of ~4 microseconds: every authorization made before the pass is expired.
    return make_settings(database_url, tmp_path, authorization_hold_hours=1e-9)


async def test_expired_authorization_is_voided_and_canceled(stub, app: Application) -> None:
    held = (await stub.Charge(charge_request(5_000, manual=True))).payment
    captured = (await stub.Charge(charge_request(6_000))).payment
    await app.recovery.run_once()

    reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=held.payment_id))
    assert reply.payment.status == S.PAYMENT_STATUS_CANCELED
    assert reply.payment.failure.code == "EXPIRED"
    assert (await events_of(app, held.payment_id))[-1][1:] == ("AUTHORIZED", "CANCELED")
    assert isinstance(app.gateway, SimulatedGateway)
    (charge,) = await app.gateway.engine.charges_of_payment(held.payment_id)
    assert charge.voided

    untouched = await stub.GetPayment(api.GetPaymentRequest(payment_id=captured.payment_id))
    assert untouched.payment.status == S.PAYMENT_STATUS_CAPTURED
    await app.recovery.run_once()  # a second pass finds nothing more to do
    assert len(await events_of(app, held.payment_id)) == 4


async def feed_envelope(app: Application, payment_id: str) -> events_pb2.PaymentEvent:
    """The payment's last event as the outbox and the change feed carry it (one encoding)."""
    async with app.engine.connect() as conn:
        payload = (
            await conn.execute(
                sa.select(payment_feed.c.payload)
                .where(payment_feed.c.payment_id == payment_id)
                .order_by(payment_feed.c.sequence.desc())
                .limit(1)
            )
        ).scalar_one()
    return events_pb2.PaymentEvent.FromString(payload)


async def watched(
    stub: payment_service_pb2_grpc.PaymentServiceStub, payment_id: str
) -> list[pb.PaymentStatusEvent]:
    """The events of a payment in its final status after its creation (the stream ends)."""
    request = api.WatchPaymentStatusRequest(payment_id=payment_id, from_sequence=1)
    return [reply.event async for reply in stub.WatchPaymentStatus(request)]


async def test_the_expiry_reason_is_on_the_payment_its_event_and_the_envelope(
    stub, app: Application
) -> None:
    held = (await stub.Charge(charge_request(5_000, manual=True))).payment
    assert held.cancellation_reason == pb.CANCELLATION_REASON_UNSPECIFIED
    await app.recovery.run_once()

    payment = (await stub.GetPayment(api.GetPaymentRequest(payment_id=held.payment_id))).payment
    assert payment.status == S.PAYMENT_STATUS_CANCELED
    assert payment.cancellation_reason == pb.CANCELLATION_REASON_EXPIRED
    events = await watched(stub, held.payment_id)
    assert [(e.status, e.cancellation_reason) for e in events] == [
        (S.PAYMENT_STATUS_PROCESSING, pb.CANCELLATION_REASON_UNSPECIFIED),
        (S.PAYMENT_STATUS_AUTHORIZED, pb.CANCELLATION_REASON_UNSPECIFIED),
        (S.PAYMENT_STATUS_CANCELED, pb.CANCELLATION_REASON_EXPIRED),
    ]
    envelope = await feed_envelope(app, held.payment_id)
    assert envelope.payment.status == S.PAYMENT_STATUS_CANCELED
    assert envelope.payment.cancellation_reason == pb.CANCELLATION_REASON_EXPIRED


async def test_an_expiry_cut_short_by_a_crash_still_ends_expired(stub, app: Application) -> None:
    """The worker claimed the void of an expired authorization and died before recording
    it; the next pass finishes the claim, reason EXPIRED (not a caller's cancel)."""
    held = (await stub.Charge(charge_request(5_000, manual=True))).payment
    async with app.engine.begin() as conn:  # what the claim transaction of expire() leaves
        await conn.execute(
            payments.update()
            .where(payments.c.id == held.payment_id)
            .values(in_flight="cancel:expired")
        )
    await app.recovery.run_once()

    payment = (await stub.GetPayment(api.GetPaymentRequest(payment_id=held.payment_id))).payment
    assert payment.status == S.PAYMENT_STATUS_CANCELED
    assert payment.cancellation_reason == pb.CANCELLATION_REASON_EXPIRED
    assert isinstance(app.gateway, SimulatedGateway)
    (charge,) = await app.gateway.engine.charges_of_payment(held.payment_id)
    assert charge.voided


async def test_a_callers_cancel_is_requested(stub, app: Application) -> None:
    """CancelPayment cancels with reason REQUESTED and no failure; a capture has none."""
    held = (await stub.Charge(charge_request(5_000, manual=True))).payment
    canceled = await stub.CancelPayment(api.CancelPaymentRequest(payment_id=held.payment_id))
    assert canceled.payment.status == S.PAYMENT_STATUS_CANCELED
    assert canceled.payment.cancellation_reason == pb.CANCELLATION_REASON_REQUESTED
    assert not canceled.payment.HasField("failure")
    assert (await watched(stub, held.payment_id))[-1].cancellation_reason == (
        pb.CANCELLATION_REASON_REQUESTED
    )
    envelope = await feed_envelope(app, held.payment_id)
    assert envelope.payment.cancellation_reason == pb.CANCELLATION_REASON_REQUESTED
    captured = (await stub.Charge(charge_request(6_000))).payment
    assert captured.cancellation_reason == pb.CANCELLATION_REASON_UNSPECIFIED
