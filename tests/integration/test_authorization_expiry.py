"""An authorization held longer than AUTHORIZATION_HOLD_HOURS is voided at the gateway and
CANCELED with reason EXPIRED by the recovery worker; other payments are left alone."""

from __future__ import annotations

import pathlib

import pytest
from payments.v1 import payment_service_pb2 as api

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
