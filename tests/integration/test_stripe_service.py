"""The service with GATEWAY=stripe: the generated stub -> a real server -> the Stripe SDK
-> the Stripe-compatible simulator, on SQLite and PostgreSQL."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import grpc
import pytest
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.adapters.gateways.stripe_simulator import RunningSimulator
from tests.helpers.builders import S, card, charge_request, usd
from tests.helpers.calls import rpc_error
from tests.stripe_sim import payment_stub, running_simulator, stripe_service


@pytest.fixture
async def sim(tmp_path: pathlib.Path) -> AsyncIterator[RunningSimulator]:
    async with running_simulator(tmp_path) as running:
        yield running


@pytest.fixture
async def stub(
    database_url: str, tmp_path: pathlib.Path, sim: RunningSimulator
) -> AsyncIterator[payment_service_pb2_grpc.PaymentServiceStub]:
    async with (
        stripe_service(database_url, tmp_path, sim) as application,
        payment_stub(application) as stub,
    ):
        yield stub


async def test_charge_is_a_payment_intent(stub, sim: RunningSimulator) -> None:
    reply = await stub.Charge(charge_request(2_500, card("tok_amex")))
    payment = reply.payment
    assert payment.status == S.PAYMENT_STATUS_CAPTURED
    assert payment.gateway_reference.startswith("pi_sim_")
    assert (payment.payment_method.card.brand, payment.payment_method.card.last4) == (
        "amex",
        "8431",
    )
    charges = await sim.simulator_engine.charges_of_payment(payment.payment_id)
    assert [c.captured_minor for c in charges] == [2_500]


async def test_partial_capture_and_refunds(stub, sim: RunningSimulator) -> None:
    authorized = (await stub.Charge(charge_request(10_000, manual=True))).payment
    assert authorized.status == S.PAYMENT_STATUS_AUTHORIZED
    captured = await stub.CapturePayment(
        api.CapturePaymentRequest(payment_id=authorized.payment_id, amount=usd(6_000))
    )
    assert captured.payment.captured_amount.amount_minor == 6_000
    for amount in (1_000, 2_000):
        await stub.Refund(api.RefundRequest(payment_id=authorized.payment_id, amount=usd(amount)))
    error = await rpc_error(
        stub.Refund(api.RefundRequest(payment_id=authorized.payment_id, amount=usd(3_001)))
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    (charge,) = await sim.simulator_engine.charges_of_payment(authorized.payment_id)
    assert (charge.captured_minor, charge.refunded_minor) == (6_000, 3_000)


async def test_cancel_voids_the_intent(stub, sim: RunningSimulator) -> None:
    authorized = (await stub.Charge(charge_request(5_000, manual=True))).payment
    canceled = await stub.CancelPayment(api.CancelPaymentRequest(payment_id=authorized.payment_id))
    assert canceled.payment.status == S.PAYMENT_STATUS_CANCELED
    (charge,) = await sim.simulator_engine.charges_of_payment(authorized.payment_id)
    assert charge.voided


async def test_decline_is_a_failed_payment(stub) -> None:
    reply = await stub.Charge(charge_request(1_000, card("tok_chargeDeclinedInsufficientFunds")))
    assert reply.payment.status == S.PAYMENT_STATUS_FAILED
    assert reply.payment.failure.code == "card_declined"
    assert reply.payment.failure.decline_code == "insufficient_funds"


async def test_a_lost_answer_is_retried_under_the_same_key(stub, sim: RunningSimulator) -> None:
    sim.simulator.faults.add(["disconnect_after", "server_error"])
    reply = await stub.Charge(charge_request(1_000))
    assert reply.payment.status == S.PAYMENT_STATUS_CAPTURED  # third attempt: the replay
    (charge,) = await sim.simulator_engine.charges_of_payment(reply.payment.payment_id)
    assert charge.captured_minor == 1_000  # charged once


async def test_gateway_errors_leave_the_payment_processing(stub, sim: RunningSimulator) -> None:
    sim.simulator.faults.add(["disconnect_after", "server_error", "server_error"])
    reply = await stub.Charge(charge_request(1_000))
    assert reply.payment.status == S.PAYMENT_STATUS_PROCESSING  # never FAILED on an unknown
    (charge,) = await sim.simulator_engine.charges_of_payment(reply.payment.payment_id)
    assert charge.captured_minor == 1_000  # Stripe did charge: a lookup will finish it
