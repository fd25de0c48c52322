"""Authentication, scopes and ownership over the wire."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from tests.helpers import (
    S,
    charge_request,
    client_metadata,
    events_of,
    row_counts,
    rpc_error,
    token,
    usd,
)

READ_CALLS = {
    "GetPayment": lambda s: s.GetPayment(api.GetPaymentRequest(payment_id="pay_x")),
    "ListPayments": lambda s: s.ListPayments(api.ListPaymentsRequest()),
    "GetRefund": lambda s: s.GetRefund(api.GetRefundRequest(refund_id="re_x")),
    "ListRefunds": lambda s: s.ListRefunds(api.ListRefundsRequest(payment_id="pay_x")),
    "WatchPaymentStatus": lambda s: s.WatchPaymentStatus(
        api.WatchPaymentStatusRequest(payment_id="pay_x")
    ).read(),
}
WRITE_CALLS = {
    "Charge": lambda s: s.Charge(charge_request()),
    "CapturePayment": lambda s: s.CapturePayment(api.CapturePaymentRequest(payment_id="pay_x")),
    "CancelPayment": lambda s: s.CancelPayment(api.CancelPaymentRequest(payment_id="pay_x")),
    "Refund": lambda s: s.Refund(api.RefundRequest(payment_id="pay_x")),
}
ALL_CALLS = READ_CALLS | WRITE_CALLS


def _stub(channel: aio.Channel) -> payment_service_pb2_grpc.PaymentServiceStub:
    return payment_service_pb2_grpc.PaymentServiceStub(channel)


@pytest.fixture
async def as_caller(app):  # type: ignore[no-untyped-def]
    """Open stubs for given tokens (None = no authorization header at all)."""
    channels: list[aio.Channel] = []

    def open_stub(jwt: str | None) -> payment_service_pb2_grpc.PaymentServiceStub:
        interceptors = client_metadata(jwt) if jwt is not None else []
        channel = aio.insecure_channel(f"127.0.0.1:{app.port}", interceptors=interceptors)
        channels.append(channel)
        return _stub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()


@pytest.mark.parametrize("name", sorted(ALL_CALLS))
async def test_no_token_is_unauthenticated_and_changes_nothing(as_caller, app, name) -> None:
    before = await row_counts(app)
    stub = as_caller(None)
    error = await rpc_error(ALL_CALLS[name](stub))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.info.reason == "UNAUTHENTICATED"
    assert error.message == "missing or invalid credentials"
    assert await row_counts(app) == before


@pytest.mark.parametrize(
    ("scopes", "name"),
    [
        (("payments.read",), "Charge"),
        (("payments.read",), "Refund"),
        (("payments.read",), "CapturePayment"),
        (("payments.charge",), "Refund"),
        (("payments.charge",), "GetPayment"),
        (("payments.refund",), "Charge"),
        (("payments.refund",), "ListPayments"),
        ((), "GetPayment"),
    ],
)
async def test_missing_scope_is_permission_denied(as_caller, scopes, name) -> None:
    error = await rpc_error(ALL_CALLS[name](as_caller(token(scopes))))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.info.reason == "PERMISSION_DENIED"
    assert error.info.metadata["requiredScope"].startswith("payments.")


async def test_scoped_service_tokens_do_their_jobs(as_caller) -> None:
    charger = as_caller(token(("payments.charge",), subject="svc-orders"))
    refunder = as_caller(token(("payments.refund",), subject="svc-support"))
    reader = as_caller(token(("payments.read",), subject="svc-reports"))
    payment = (await charger.Charge(charge_request(1_000))).payment
    refund = await refunder.Refund(
        api.RefundRequest(payment_id=payment.payment_id, amount=usd(100))
    )
    got = await reader.GetPayment(api.GetPaymentRequest(payment_id=payment.payment_id))
    assert refund.payment.refunded_amount.amount_minor == 100
    assert got.payment == refund.payment


async def test_events_record_the_caller_as_actor(as_caller, app) -> None:
    stub = as_caller(token(("payments.charge",), subject="svc-orders"))
    payment = (await stub.Charge(charge_request())).payment
    async with app.engine.connect() as conn:
        import sqlalchemy as sa

        from payment_grpc.adapters.db.tables import payment_events

        actors = (
            (
                await conn.execute(
                    sa.select(payment_events.c.actor).where(
                        payment_events.c.payment_id == payment.payment_id
                    )
                )
            )
            .scalars()
            .all()
        )
    assert set(actors) == {"svc-orders"}
    assert len(await events_of(app, payment.payment_id)) == 3


async def test_idempotency_keys_are_scoped_to_the_caller(as_caller) -> None:
    one = as_caller(token(subject="svc-one"))
    two = as_caller(token(subject="svc-two"))
    key = (("idempotency-key", "shared-key"),)
    first = await one.Charge(charge_request(order_id="ord_scope_1"), metadata=key)
    second = await two.Charge(charge_request(order_id="ord_scope_2"), metadata=key)
    assert first.payment.payment_id != second.payment.payment_id


async def test_health_and_reflection_need_no_token(app) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="payments.v1.PaymentService")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


class TestCustomerOwnership:
    async def _setup(self, as_caller):  # type: ignore[no-untyped-def]
        admin = as_caller(token())
        mine = (await admin.Charge(charge_request(1_000, customer_id="cus_me"))).payment
        theirs = (await admin.Charge(charge_request(1_000, customer_id="cus_other"))).payment
        my_refund = (
            await admin.Refund(api.RefundRequest(payment_id=mine.payment_id, amount=usd(10)))
        ).refund
        their_refund = (
            await admin.Refund(api.RefundRequest(payment_id=theirs.payment_id, amount=usd(10)))
        ).refund
        customer = as_caller(token(("payments.read",), subject="cus_me", customer_id="cus_me"))
        return customer, mine, theirs, my_refund, their_refund

    async def test_get_own_and_not_others(self, as_caller) -> None:
        customer, mine, theirs, _, _ = await self._setup(as_caller)
        assert (
            await customer.GetPayment(api.GetPaymentRequest(payment_id=mine.payment_id))
        ).payment.payment_id == mine.payment_id
        error = await rpc_error(
            customer.GetPayment(api.GetPaymentRequest(payment_id=theirs.payment_id))
        )
        assert error.code == grpc.StatusCode.NOT_FOUND

    async def test_list_filter_cannot_widen(self, as_caller) -> None:
        customer, mine, _, _, _ = await self._setup(as_caller)
        listed = await customer.ListPayments(api.ListPaymentsRequest())
        assert [p.payment_id for p in listed.payments] == [mine.payment_id]
        other = await customer.ListPayments(api.ListPaymentsRequest(customer_id="cus_other"))
        assert list(other.payments) == []

    async def test_watch_refunds_only_own(self, as_caller) -> None:
        customer, mine, theirs, my_refund, their_refund = await self._setup(as_caller)
        events = [
            m
            async for m in customer.WatchPaymentStatus(
                api.WatchPaymentStatusRequest(payment_id=mine.payment_id)
            )
        ]
        assert events[-1].event.status == S.PAYMENT_STATUS_PARTIALLY_REFUNDED
        for call in (
            customer.WatchPaymentStatus(
                api.WatchPaymentStatusRequest(payment_id=theirs.payment_id)
            ).read(),
            customer.GetRefund(api.GetRefundRequest(refund_id=their_refund.refund_id)),
            customer.ListRefunds(api.ListRefundsRequest(payment_id=theirs.payment_id)),
        ):
            assert (await rpc_error(call)).code == grpc.StatusCode.NOT_FOUND
        own = await customer.GetRefund(api.GetRefundRequest(refund_id=my_refund.refund_id))
        assert own.refund == my_refund
        listed = await customer.ListRefunds(api.ListRefundsRequest(payment_id=mine.payment_id))
        assert [r.refund_id for r in listed.refunds] == [my_refund.refund_id]

    async def test_customer_tokens_cannot_move_money(self, as_caller) -> None:
        customer = as_caller(
            token(("payments.charge", "payments.read"), subject="cus_me", customer_id="cus_me")
        )
        error = await rpc_error(customer.Charge(charge_request(customer_id="cus_me")))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
