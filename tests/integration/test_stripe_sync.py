"""With GATEWAY=stripe: a lost webhook or a lost answer is finished by the sync (the
recovery worker's lookup), never FAILED by a timeout; reconcile against Stripe's lists."""

from __future__ import annotations

import io
import json
import pathlib
from datetime import UTC, datetime, timedelta

from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.reconcile_cli import report
from tests.helpers.builders import S, charge_request, usd
from tests.stripe_sim import payment_stub, running_simulator, stripe_service


def upi() -> pb.PaymentMethod:
    return pb.PaymentMethod(upi=pb.UpiMethod(vpa="payer@okbank"))


async def status_of(stub, payment_id: str) -> int:  # type: ignore[no-untyped-def]
    reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=payment_id))
    return int(reply.payment.status)


async def test_a_lost_webhook_is_finished_by_sync(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with (
        running_simulator(tmp_path) as sim,
        stripe_service(database_url, tmp_path, sim) as app,
        payment_stub(app) as stub,
    ):
        sim.simulator.webhooks.url = ""  # every webhook is lost
        reply = await stub.Charge(charge_request(50_000, upi(), currency="INR"))
        assert reply.payment.status == S.PAYMENT_STATUS_PROCESSING
        await sim.simulator_engine.settlements_done()
        assert await status_of(stub, reply.payment.payment_id) == S.PAYMENT_STATUS_PROCESSING
        await app.recovery.run_once()
        assert await status_of(stub, reply.payment.payment_id) == S.PAYMENT_STATUS_CAPTURED


async def test_a_timeout_stays_processing_until_sync(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with (
        running_simulator(tmp_path) as sim,
        stripe_service(
            database_url, tmp_path, sim, stripe_timeout_seconds=0.3, gateway_retry_attempts=1
        ) as app,
        payment_stub(app) as stub,
    ):
        sim.simulator.faults.add(["slow:1500"])
        reply = await stub.Charge(charge_request(3_000))
        assert reply.payment.status == S.PAYMENT_STATUS_PROCESSING  # never FAILED
        await app.recovery.run_once()
        assert await status_of(stub, reply.payment.payment_id) == S.PAYMENT_STATUS_CAPTURED


async def test_reconcile_against_stripes_lists(database_url: str, tmp_path: pathlib.Path) -> None:
    async with (
        running_simulator(tmp_path) as sim,
        stripe_service(database_url, tmp_path, sim) as app,
        payment_stub(app) as stub,
    ):
        since = datetime.now(UTC) - timedelta(seconds=5)
        captured = (await stub.Charge(charge_request(4_000))).payment
        await stub.Refund(api.RefundRequest(payment_id=captured.payment_id, amount=usd(1_500)))
        authorized = (await stub.Charge(charge_request(2_000, manual=True))).payment
        await stub.CapturePayment(
            api.CapturePaymentRequest(payment_id=authorized.payment_id, amount=usd(1_200))
        )
        out = io.StringIO()
        until = datetime.now(UTC) + timedelta(seconds=5)
        code = await report(app.settings, since, until, "json", out)
        assert (code, json.loads(out.getvalue())["count"]) == (0, 0)


async def test_expired_authorization_cancels_the_payment_intent(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with (
        running_simulator(tmp_path) as sim,
        stripe_service(database_url, tmp_path, sim, authorization_hold_hours=1e-9) as app,
        payment_stub(app) as stub,
    ):
        held = (await stub.Charge(charge_request(5_000, manual=True))).payment
        await app.recovery.run_once()
        assert await status_of(stub, held.payment_id) == S.PAYMENT_STATUS_CANCELED
        (charge,) = await sim.simulator_engine.charges_of_payment(held.payment_id)
        assert charge.voided
        reply = await stub.GetPayment(api.GetPaymentRequest(payment_id=held.payment_id))
        assert reply.payment.cancellation_reason == pb.CANCELLATION_REASON_EXPIRED
