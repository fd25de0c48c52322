"""AdminService through the generated stub on both databases: settle a stuck payment by
hand (only along the transition table, recorded as an event with actor, reason and trace
id), the audit trail, statistics, and the admin scope."""

from __future__ import annotations

import logging
import pathlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from grpc import aio
from payments.v1 import admin_service_pb2 as admin
from payments.v1 import admin_service_pb2_grpc, payment_service_pb2_grpc
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.bootstrap import Application, build_application
from tests.conftest import make_settings
from tests.helpers.builders import card, charge_request
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata, token
from tests.helpers.db import events_of

AdminStub = admin_service_pb2_grpc.AdminServiceStub
PaymentStub = payment_service_pb2_grpc.PaymentServiceStub
UPI = pb.PaymentMethod(upi=pb.UpiMethod(vpa="asha@okbank"))


@pytest.fixture
async def app(database_url: str, tmp_path: pathlib.Path) -> AsyncIterator[Application]:
    """UPI payments stay PROCESSING for the whole test: the gateway settles them in an
    hour, and the recovery worker does not run."""
    application = build_application(
        make_settings(database_url, tmp_path, gateway_async_settle_ms=3_600_000)
    )
    await application.start()
    try:
        yield application
    finally:
        await application.stop()


@pytest.fixture
def admin_stub(channel: aio.Channel) -> AdminStub:
    return AdminStub(channel)


def traced(trace_id: str) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"),)


async def stuck_payment(stub: PaymentStub, **fields: object) -> pb.Payment:
    reply = await stub.Charge(charge_request(2_500, UPI, currency="INR", **fields))
    assert reply.payment.status == pb.PAYMENT_STATUS_PROCESSING
    return reply.payment


def resolve(payment_id: str, status: int, reason: str = "PSP dashboard: declined") -> object:
    return admin.ResolvePaymentRequest(payment_id=payment_id, status=status, reason=reason)


async def test_a_stuck_payment_is_failed_by_hand_with_actor_reason_and_trace(
    stub: PaymentStub, admin_stub: AdminStub, app: Application
) -> None:
    payment = await stuck_payment(stub)
    watch = stub.WatchPaymentStatus(api.WatchPaymentStatusRequest(payment_id=payment.payment_id))
    await watch.read()  # the snapshot: watching
    trace_id = uuid.uuid4().hex

    reply = await admin_stub.ResolvePayment(
        resolve(payment.payment_id, pb.PAYMENT_STATUS_FAILED, "ticket OPS-42: PSP says declined"),
        metadata=traced(trace_id),
    )

    assert reply.payment.status == pb.PAYMENT_STATUS_FAILED
    assert reply.payment.failure.code == "resolved_manually"
    seen = [message.event.status async for message in watch]  # the watcher hears it
    assert seen == [pb.PAYMENT_STATUS_FAILED]
    trail = await admin_stub.ListPaymentEvents(
        admin.ListPaymentEventsRequest(payment_id=payment.payment_id, reason="OPS-42")
    )
    statuses = [(e.event.previous_status, e.event.status) for e in trail.entries]
    assert statuses == [
        (pb.PAYMENT_STATUS_UNSPECIFIED, pb.PAYMENT_STATUS_PENDING),
        (pb.PAYMENT_STATUS_PENDING, pb.PAYMENT_STATUS_PROCESSING),
        (pb.PAYMENT_STATUS_PROCESSING, pb.PAYMENT_STATUS_FAILED),
    ]
    resolved = trail.entries[-1]
    assert resolved.actor == "svc-tests"
    assert resolved.trace_id == trace_id
    assert resolved.reason == "ticket OPS-42: PSP says declined"
    assert resolved.event.sequence == 3
    assert all(e.reason == "" for e in trail.entries[:-1])
    # The same request again (a retry) answers the payment as it is: no second event.
    again = await admin_stub.ResolvePayment(
        resolve(payment.payment_id, pb.PAYMENT_STATUS_FAILED, "ticket OPS-42: PSP says declined")
    )
    assert again.payment.status == pb.PAYMENT_STATUS_FAILED
    assert len(await events_of(app, payment.payment_id)) == 3


async def test_resolving_to_captured_records_the_whole_amount(
    stub: PaymentStub, admin_stub: AdminStub
) -> None:
    payment = await stuck_payment(stub)
    reply = await admin_stub.ResolvePayment(
        resolve(payment.payment_id, pb.PAYMENT_STATUS_CAPTURED, "PSP: settled")
    )
    assert reply.payment.status == pb.PAYMENT_STATUS_CAPTURED
    assert reply.payment.captured_amount.amount_minor == 2_500
    assert reply.payment.captured_amount.currency == "INR"


async def test_an_authorized_payment_can_be_canceled_by_hand(
    stub: PaymentStub, admin_stub: AdminStub
) -> None:
    charged = await stub.Charge(charge_request(manual=True))
    assert charged.payment.status == pb.PAYMENT_STATUS_AUTHORIZED
    reply = await admin_stub.ResolvePayment(
        resolve(charged.payment.payment_id, pb.PAYMENT_STATUS_CANCELED, "customer called")
    )
    assert reply.payment.status == pb.PAYMENT_STATUS_CANCELED


async def test_a_cancel_by_hand_has_the_reason_resolved_manually(
    stub: PaymentStub, admin_stub: AdminStub
) -> None:
    charged = await stub.Charge(charge_request(manual=True))
    reply = await admin_stub.ResolvePayment(
        resolve(charged.payment.payment_id, pb.PAYMENT_STATUS_CANCELED, "customer called")
    )
    assert reply.payment.cancellation_reason == pb.CANCELLATION_REASON_RESOLVED_MANUALLY


async def test_only_transitions_the_state_machine_allows(
    stub: PaymentStub, admin_stub: AdminStub, app: Application
) -> None:
    captured = (await stub.Charge(charge_request())).payment
    assert captured.status == pb.PAYMENT_STATUS_CAPTURED
    for status in (pb.PAYMENT_STATUS_FAILED, pb.PAYMENT_STATUS_CANCELED):
        error = await rpc_error(
            admin_stub.ResolvePayment(resolve(captured.payment_id, status, "wrong"))
        )
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.info.reason == "PAYMENT_UNEXPECTED_STATE"
        assert error.info.metadata["currentStatus"] == "CAPTURED"
    stuck = await stuck_payment(stub)
    error = await rpc_error(
        admin_stub.ResolvePayment(resolve(stuck.payment_id, pb.PAYMENT_STATUS_CANCELED))
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION  # PROCESSING -> CANCELED: no
    assert len(await events_of(app, captured.payment_id)) == 3
    assert len(await events_of(app, stuck.payment_id)) == 2


async def test_bad_requests_change_nothing(
    stub: PaymentStub, admin_stub: AdminStub, app: Application
) -> None:
    stuck = await stuck_payment(stub)
    refunded = resolve(stuck.payment_id, pb.PAYMENT_STATUS_REFUNDED)
    error = await rpc_error(admin_stub.ResolvePayment(refunded))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == {"status"}
    no_reason = resolve(stuck.payment_id, pb.PAYMENT_STATUS_FAILED, reason="")
    error = await rpc_error(admin_stub.ResolvePayment(no_reason))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == {"reason"}
    pan = resolve(stuck.payment_id, pb.PAYMENT_STATUS_FAILED, reason="card 4242424242424242")
    error = await rpc_error(admin_stub.ResolvePayment(pan))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "4242424242424242" not in error.message
    missing = resolve("pay_" + "0" * 32, pb.PAYMENT_STATUS_FAILED)
    assert (await rpc_error(admin_stub.ResolvePayment(missing))).code == grpc.StatusCode.NOT_FOUND
    assert len(await events_of(app, stuck.payment_id)) == 2


async def test_the_trail_is_paged(stub: PaymentStub, admin_stub: AdminStub) -> None:
    payment = (await stub.Charge(charge_request())).payment  # PENDING, PROCESSING, CAPTURED
    first = await admin_stub.ListPaymentEvents(
        admin.ListPaymentEventsRequest(payment_id=payment.payment_id, page_size=2)
    )
    assert [e.event.sequence for e in first.entries] == [1, 2]
    assert first.next_page_token
    rest = await admin_stub.ListPaymentEvents(
        admin.ListPaymentEventsRequest(
            payment_id=payment.payment_id, page_size=2, page_token=first.next_page_token
        )
    )
    assert [e.event.sequence for e in rest.entries] == [3]
    assert rest.next_page_token == ""
    other = (await stub.Charge(charge_request())).payment
    foreign = admin.ListPaymentEventsRequest(
        payment_id=other.payment_id, page_token=first.next_page_token
    )
    error = await rpc_error(admin_stub.ListPaymentEvents(foreign))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    unknown = admin.ListPaymentEventsRequest(payment_id="pay_" + "0" * 32)
    assert (
        await rpc_error(admin_stub.ListPaymentEvents(unknown))
    ).code == grpc.StatusCode.NOT_FOUND


def window(start: datetime, end: datetime) -> admin.GetPaymentStatsRequest:
    request = admin.GetPaymentStatsRequest(reason="weekly report")
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    return request


async def test_stats_count_and_sum_by_status_method_and_currency(
    stub: PaymentStub, admin_stub: AdminStub
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    await stub.Charge(charge_request(1_000))
    await stub.Charge(charge_request(2_000))
    await stub.Charge(charge_request(500, card("tok_chargeDeclined")))
    await stub.Charge(charge_request(700, currency="EUR"))
    await stuck_payment(stub)
    after = datetime.now(UTC) + timedelta(seconds=1)

    stats = await admin_stub.GetPaymentStats(window(before, after))

    groups = {
        (pb.PaymentStatus.Name(g.status), pb.PaymentMethodType.Name(g.method_type), g.currency): (
            g.payment_count,
            g.amount.amount_minor,
            g.captured_amount.amount_minor,
        )
        for g in stats.groups
    }
    assert groups == {
        ("PAYMENT_STATUS_CAPTURED", "PAYMENT_METHOD_TYPE_CARD", "USD"): (2, 3_000, 3_000),
        ("PAYMENT_STATUS_FAILED", "PAYMENT_METHOD_TYPE_CARD", "USD"): (1, 500, 0),
        ("PAYMENT_STATUS_CAPTURED", "PAYMENT_METHOD_TYPE_CARD", "EUR"): (1, 700, 700),
        ("PAYMENT_STATUS_PROCESSING", "PAYMENT_METHOD_TYPE_UPI", "INR"): (1, 2_500, 0),
    }
    assert [g.currency for g in stats.groups] == sorted(g.currency for g in stats.groups)
    assert (stats.succeeded_count, stats.failed_count, stats.success_rate_bps) == (3, 1, 7_500)

    later = await admin_stub.GetPaymentStats(window(after, after + timedelta(days=1)))
    assert list(later.groups) == []
    assert later.success_rate_bps == 0


async def test_stats_window_is_checked(admin_stub: AdminStub) -> None:
    now = datetime.now(UTC)
    for start, end in (
        (now, now),
        (now, now - timedelta(hours=1)),
        (now, now + timedelta(days=400)),
    ):
        error = await rpc_error(admin_stub.GetPaymentStats(window(start, end)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "366 days" in str(error.bad_request)
    error = await rpc_error(admin_stub.GetPaymentStats(admin.GetPaymentStatsRequest()))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == {"start_time", "end_time"}


async def test_admin_scope_is_required_and_every_call_is_audited(
    app: Application, stub: PaymentStub, caplog: pytest.LogCaptureFixture
) -> None:
    payment = await stuck_payment(stub)
    target = f"127.0.0.1:{app.port}"
    operator = token(("payments.read", "payments.charge", "payments.refund"))
    async with aio.insecure_channel(target, interceptors=client_metadata(operator)) as channel:
        denied = AdminStub(channel)
        calls = (
            denied.ResolvePayment(resolve(payment.payment_id, pb.PAYMENT_STATUS_FAILED)),
            denied.ListPaymentEvents(admin.ListPaymentEventsRequest(payment_id="pay_1")),
            denied.GetPaymentStats(window(datetime.now(UTC), datetime.now(UTC) + timedelta(1))),
        )
        for call in calls:
            assert (await rpc_error(call)).code == grpc.StatusCode.PERMISSION_DENIED
    async with aio.insecure_channel(target) as anonymous:
        call = AdminStub(anonymous).ListPaymentEvents(
            admin.ListPaymentEventsRequest(payment_id=payment.payment_id)
        )
        assert (await rpc_error(call)).code == grpc.StatusCode.UNAUTHENTICATED

    caplog.set_level(logging.INFO, logger="payment_grpc.audit")
    async with aio.insecure_channel(target, interceptors=client_metadata()) as channel:
        await AdminStub(channel).ResolvePayment(
            resolve(payment.payment_id, pb.PAYMENT_STATUS_FAILED, "ticket OPS-7")
        )
        refused = AdminStub(channel).ResolvePayment(
            resolve(payment.payment_id, pb.PAYMENT_STATUS_CAPTURED, "ticket OPS-8")
        )
        assert (await rpc_error(refused)).code == grpc.StatusCode.FAILED_PRECONDITION
    audits = [
        (r.actor, r.action, r.reason, r.outcome)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "admin audit"
    ]
    assert audits == [
        ("svc-tests", "ResolvePayment", "ticket OPS-7", "ok"),
        ("svc-tests", "ResolvePayment", "ticket OPS-8", "PAYMENT_UNEXPECTED_STATE"),
    ]
