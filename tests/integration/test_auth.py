"""Authentication, scopes and ownership over the wire."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.adapters.clock import SystemClock
from payment_grpc.adapters.db.engine import SqlUnitOfWorkFactory
from payment_grpc.adapters.faults import NoFaults
from payment_grpc.bootstrap import Application, build_cipher
from payment_grpc.domain.errors import PaymentNotFound, RefundNotFound
from payment_grpc.service.context import RequestContext
from payment_grpc.service.deps import Deps
from payment_grpc.service.ports import PaymentFilter
from payment_grpc.service.queries import Queries
from tests.helpers.builders import S, charge_request, usd
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata, token, token_with_claims
from tests.helpers.db import events_of, row_counts

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


async def test_reflection_needs_no_token(app) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.write(
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="payments.v1.PaymentService"
            )
        )
        described = await call.read()
        await call.done_writing()
    names = {service.name for service in listed.list_services_response.service}
    assert "payments.v1.PaymentService" in names
    assert described.file_descriptor_response.file_descriptor_proto


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


EMPTY_CUSTOMER_TOKENS = {
    "customer_id-claim": lambda: token_with_claims(sub="cus_me", customer_id=""),
    "blank-customer_id-claim": lambda: token_with_claims(sub="cus_me", customer_id="  "),
    "customer-role-empty-sub": lambda: token_with_claims(sub="", roles=["customer"]),
}


class TestEmptyCustomerId:
    """A customer token naming no customer must not read as "every customer"."""

    async def _calls(self, as_caller):  # type: ignore[no-untyped-def]
        admin = as_caller(token())
        nobodys = (await admin.Charge(charge_request(1_000))).payment  # customer_id ""
        theirs = (await admin.Charge(charge_request(1_000, customer_id="cus_other"))).payment
        refund = (
            await admin.Refund(api.RefundRequest(payment_id=nobodys.payment_id, amount=usd(10)))
        ).refund
        await admin.Refund(api.RefundRequest(payment_id=theirs.payment_id, amount=usd(10)))
        return {
            "GetPayment": lambda s: s.GetPayment(
                api.GetPaymentRequest(payment_id=nobodys.payment_id)
            ),
            "ListPayments": lambda s: s.ListPayments(api.ListPaymentsRequest()),
            "WatchPaymentStatus": lambda s: s.WatchPaymentStatus(
                api.WatchPaymentStatusRequest(payment_id=nobodys.payment_id)
            ).read(),
            "GetRefund": lambda s: s.GetRefund(api.GetRefundRequest(refund_id=refund.refund_id)),
            "ListRefunds": lambda s: s.ListRefunds(
                api.ListRefundsRequest(payment_id=nobodys.payment_id)
            ),
        }

    @pytest.mark.parametrize("kind", sorted(EMPTY_CUSTOMER_TOKENS))
    async def test_is_unauthenticated_for_every_read(self, as_caller, kind) -> None:
        calls = await self._calls(as_caller)
        customer = as_caller(EMPTY_CUSTOMER_TOKENS[kind]())
        for name, call in calls.items():
            error = await rpc_error(call(customer))
            assert (name, error.code) == (name, grpc.StatusCode.UNAUTHENTICATED)
            assert error.message == "missing or invalid credentials"

    async def test_queries_show_a_customer_without_id_nothing(self, as_caller, app) -> None:
        """Fail safe below the verifier: should such a principal ever get through."""
        await self._calls(as_caller)  # the payments and refunds to hide
        queries = _queries(app)
        nobody = RequestContext(subject="cus_me", customer_id="", scopes=frozenset())
        everyone = await queries.list_payments(PaymentFilter(), 50, "", SYSTEM_READER)
        payment = next(p for p in everyone.items if p.customer_id == "")
        refund = (await queries.list_refunds(payment.payment_id, 50, "", SYSTEM_READER)).items[0]
        assert (await queries.list_payments(PaymentFilter(), 50, "", nobody)).items == []
        with pytest.raises(PaymentNotFound):
            await queries.get_payment(payment.payment_id, nobody)
        with pytest.raises(PaymentNotFound):
            await queries.list_refunds(payment.payment_id, 50, "", nobody)
        with pytest.raises(RefundNotFound):
            await queries.get_refund(refund.refund_id, nobody)
        with pytest.raises(PaymentNotFound):
            await anext(aiter(queries.watch(payment.payment_id, 0, False, nobody)))


SYSTEM_READER = RequestContext(subject="svc-tests", scopes=frozenset({"payments.admin"}))


def _queries(app: Application) -> Queries:
    uow = SqlUnitOfWorkFactory(app.engine, build_cipher(app.settings))
    deps = Deps(uow=uow, gateway=app.gateway, bus=app.bus, clock=SystemClock(), faults=NoFaults())
    return Queries(deps)


async def test_token_cli_refuses_an_empty_customer(tmp_path: pathlib.Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payment_grpc", "token", "--customer", "",
        env={**os.environ, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 2
    assert out == b""
    assert b"--customer" in err
