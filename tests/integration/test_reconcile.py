"""`payment-grpc reconcile`: our payments and refunds against the gateway's ledger; zero
mismatches after normal traffic, and each planted kind of mismatch found (exit 1)."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from payments.v1 import payment_service_pb2 as api

from payment_grpc.adapters.db.tables import payments, refunds
from payment_grpc.bootstrap import Application
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import PaymentMethod, PaymentMethodType
from payment_grpc.reconcile_cli import report
from payment_grpc.service.ports import AuthorizationRequest
from tests.helpers.builders import card, charge_request, usd


async def traffic(stub) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """One payment in each settled state; returns name -> payment id."""
    captured = (await stub.Charge(charge_request(4_000))).payment
    authorized = (await stub.Charge(charge_request(5_000, manual=True))).payment
    refunded = (await stub.Charge(charge_request(6_000))).payment
    await stub.Refund(api.RefundRequest(payment_id=refunded.payment_id, amount=usd(1_000)))
    canceled = (await stub.Charge(charge_request(7_000, manual=True))).payment
    await stub.CancelPayment(api.CancelPaymentRequest(payment_id=canceled.payment_id))
    declined = (await stub.Charge(charge_request(8_000, card("tok_chargeDeclined")))).payment
    return {
        "captured": captured.payment_id,
        "authorized": authorized.payment_id,
        "refunded": refunded.payment_id,
        "canceled": canceled.payment_id,
        "declined": declined.payment_id,
    }


async def reconciled(app: Application, since: datetime) -> tuple[int, list[dict[str, str]]]:
    out = io.StringIO()
    until = datetime.now(UTC) + timedelta(seconds=5)
    code = await report(app.settings, since, until, "json", out)
    return code, json.loads(out.getvalue())["mismatches"]


async def test_normal_traffic_reconciles_and_each_planted_mismatch_is_found(
    stub, app: Application
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=5)
    ids = await traffic(stub)
    assert await reconciled(app, since) == (0, [])

    stranger = f"pay_{uuid.uuid4().hex}"  # charged at the gateway, unknown here
    await app.gateway.authorize(
        AuthorizationRequest(
            f"{stranger}:authorize",
            stranger,
            Money("USD", 900),
            PaymentMethod(PaymentMethodType.CARD, "tok_visa"),
            capture=True,
        )
    )
    async with app.engine.begin() as conn:
        await conn.execute(
            sa.update(payments)
            .where(payments.c.id == ids["captured"])
            .values(captured_minor=3_999)  # amount
        )
        await conn.execute(
            sa.update(payments)
            .where(payments.c.id == ids["authorized"])
            .values(status="CANCELED")  # status
        )
        now = datetime.now(UTC)
        await conn.execute(
            sa.insert(refunds).values(  # a refund the gateway never made
                id=f"ref_{uuid.uuid4().hex}",
                payment_id=ids["refunded"],
                currency="USD",
                amount_minor=1,
                status="SUCCEEDED",
                reason="REQUESTED_BY_CUSTOMER",
                gateway_reference="re_sim_planted",
                failure_code="",
                created_at=now,
                updated_at=now,
            )
        )
    code, found = await reconciled(app, since)
    assert code == 1
    kinds = sorted((m["kind"], m["payment_id"]) for m in found)
    assert kinds == sorted(
        [
            ("amount", ids["captured"]),
            ("status", ids["authorized"]),
            ("missing_there", ids["refunded"]),
            ("missing_here", stranger),
        ]
    )
