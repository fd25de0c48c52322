"""Traces leave the process over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set: a real
server process, a real collector, a real auth service that sees our traceparent."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from auth.v1 import auth_service_pb2_grpc
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc

from payment_grpc.telemetry.tracing import export_configured
from tests.e2e.otlp_collector import ExportedSpan, otlp_collector
from tests.e2e.server_process import ServerProcess, server_env
from tests.fake_order_service import order_service
from tests.helpers.builders import charge_request, order_id
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata
from tests.helpers.nats import NATS_URL, own_jetstream, read_all
from tests.integration.test_auth_service import FakeAuthService

pytestmark = pytest.mark.slow

SERVER, CLIENT, PRODUCER = 2, 3, 4  # OTLP span kinds
CHARGE = "payments.v1.PaymentService/Charge"


class TracedAuthService(FakeAuthService):
    """The auth service, remembering the traceparent of every VerifyToken call."""

    def __init__(self) -> None:
        super().__init__()
        self.traceparents: list[str] = []

    async def VerifyToken(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        metadata = dict(context.invocation_metadata())
        self.traceparents.append(metadata.get("traceparent", ""))
        return await super().VerifyToken(request, context)


async def started_auth_service() -> tuple[TracedAuthService, aio.Server, int]:
    fake = TracedAuthService()
    server = aio.server()
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return fake, server, port


def traceparent(trace_id: str, parent_id: str) -> tuple[str, str]:
    return ("traceparent", f"00-{trace_id}-{parent_id}-01")


def server_span(spans: list[ExportedSpan], trace_id: str, name: str) -> ExportedSpan | None:
    return next(
        (s for s in spans if s.trace_id == trace_id and s.kind == SERVER and s.name == name),
        None,
    )


@pytest.fixture
async def traced_server(
    database_url: str, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[ServerProcess, TracedAuthService, object]]:
    auth, auth_server, auth_port = await started_auth_service()
    async with otlp_collector() as (collector, endpoint):
        server = ServerProcess(
            server_env(
                database_url,
                tmp_path,
                OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                OTEL_BSP_SCHEDULE_DELAY="20",
                OTEL_SERVICE_NAME="payments-under-test",
                AUTH_SERVICE_ADDR=f"127.0.0.1:{auth_port}",
                INSTANCE_ID="traced-1",
            ),
            cwd=tmp_path,
        )
        await server.start()
        server.follow()
        try:
            yield server, auth, collector
        finally:
            server.sigterm()
            await server.wait()
            await auth_server.stop(None)


def is_rpc_client(span: ExportedSpan) -> bool:
    """An outgoing gRPC call's span; the database's "connect" spans are CLIENT spans too."""
    return bool(span.kind == CLIENT and "rpc.system" in span.attributes)


async def test_server_db_and_auth_spans_join_the_callers_trace(traced_server) -> None:  # type: ignore[no-untyped-def]
    server, auth, collector = traced_server
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    async with aio.insecure_channel(
        f"127.0.0.1:{server.port}", interceptors=client_metadata()
    ) as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        reply = await stub.Charge(
            charge_request(), metadata=(traceparent(trace_id, parent_id),), timeout=30
        )
        payment_id = reply.payment.payment_id

    spans = await asyncio.wait_for(
        collector.wait_for(
            lambda spans: (
                server_span(spans, trace_id, CHARGE) is not None
                and any(s.trace_id == trace_id and "db.system" in s.attributes for s in spans)
                and any(s.trace_id == trace_id and is_rpc_client(s) for s in spans)
            )
        ),
        timeout=30,
    )
    charge = server_span(spans, trace_id, CHARGE)
    assert charge is not None
    assert charge.parent_span_id == parent_id  # the caller's span is the parent
    assert charge.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "payments.v1.PaymentService",
        "rpc.method": "Charge",
        "rpc.grpc.status_code": 0,
    }
    assert charge.resource["service.name"] == "payments-under-test"
    assert charge.resource["service.instance.id"] == "traced-1"

    verify = next(s for s in spans if s.trace_id == trace_id and is_rpc_client(s))
    assert verify.name == "auth.v1.AuthService/VerifyToken"
    assert verify.parent_span_id == charge.span_id
    assert verify.attributes["rpc.grpc.status_code"] == 0
    # The auth service received our client span as its parent.
    assert f"00-{trace_id}-{verify.span_id}-01" in auth.traceparents

    statements = [s for s in spans if s.trace_id == trace_id and "db.system" in s.attributes]
    assert statements
    assert all(s.attributes["db.system"] in ("sqlite", "postgresql") for s in statements)
    # Parameters are never exported (card data and keys travel as parameters).
    assert not any("tok_visa" in str(s.attributes) for s in statements)
    assert payment_id


async def test_an_aborted_call_records_its_real_status_code(traced_server) -> None:  # type: ignore[no-untyped-def]
    server, _, collector = traced_server
    trace_id = uuid.uuid4().hex
    async with aio.insecure_channel(
        f"127.0.0.1:{server.port}", interceptors=client_metadata()
    ) as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        call = stub.GetPayment(
            api.GetPaymentRequest(payment_id="pay_" + "0" * 32),
            metadata=(traceparent(trace_id, uuid.uuid4().hex[:16]),),
            timeout=30,
        )
        error = await rpc_error(call)
        assert error.code == grpc.StatusCode.NOT_FOUND  # sent with abort_with_status
        invalid = stub.Charge(
            api.ChargeRequest(),
            metadata=(traceparent(trace_id, uuid.uuid4().hex[:16]),),
            timeout=30,
        )
        assert (await rpc_error(invalid)).code == grpc.StatusCode.INVALID_ARGUMENT

    get = "payments.v1.PaymentService/GetPayment"
    spans = await asyncio.wait_for(
        collector.wait_for(
            lambda spans: (
                server_span(spans, trace_id, get) is not None
                and server_span(spans, trace_id, CHARGE) is not None
            )
        ),
        timeout=30,
    )
    not_found = server_span(spans, trace_id, get)
    assert not_found is not None
    assert not_found.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not_found.status_code == 0  # the caller's mistake: no server error
    invalid_span = server_span(spans, trace_id, CHARGE)
    assert invalid_span is not None
    assert invalid_span.attributes["rpc.grpc.status_code"] == 3


def test_nothing_is_exported_without_an_endpoint() -> None:
    assert not export_configured({})
    assert not export_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert export_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert export_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"})
    assert not export_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}
    )
    assert not export_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}
    )


async def test_outbox_deliveries_continue_the_charges_trace(  # type: ignore[no-untyped-def]
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """With spans exported: the order service's notification is a CLIENT span and the NATS
    message a PRODUCER span of ours, both children of the Charge's server span, and each
    receiver sees its own span as the traceparent's parent."""
    async with contextlib.AsyncExitStack() as stack:
        js, stream, prefix = await stack.enter_async_context(own_jetstream())
        orders, order_port = await stack.enter_async_context(order_service())
        collector, endpoint = await stack.enter_async_context(otlp_collector())
        order = orders.add(order_id(), 10_000)
        server = ServerProcess(
            server_env(
                database_url, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                OTEL_BSP_SCHEDULE_DELAY="20", ORDER_SERVICE_ADDR=f"127.0.0.1:{order_port}",
                NATS_URL=NATS_URL, NATS_STREAM=stream, NATS_SUBJECT_PREFIX=prefix,
            ),
            cwd=tmp_path,
        )  # fmt: skip
        await server.start()
        server.follow()
        try:
            trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            async with aio.insecure_channel(
                f"127.0.0.1:{server.port}", interceptors=client_metadata()
            ) as channel:
                stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
                await stub.Charge(
                    charge_request(10_000, order_id=order.order_id),
                    metadata=(traceparent(trace_id, parent_id),),
                    timeout=30,
                )
            messages = await read_all(js, stream, f"{prefix}.>", 3)
            await asyncio.wait_for(
                orders.wait_until(lambda: len(orders.notifications) >= 1), timeout=30
            )
            spans = await asyncio.wait_for(
                collector.wait_for(
                    lambda spans: (
                        sum(s.trace_id == trace_id and s.kind == PRODUCER for s in spans) >= 3
                        and sum(s.trace_id == trace_id and s.kind == CLIENT for s in spans) >= 2
                    )
                ),
                timeout=30,
            )
        finally:
            server.sigterm()
            await server.wait()
    charge = server_span(spans, trace_id, CHARGE)
    assert charge is not None
    ours = {s.span_id: s for s in spans if s.trace_id == trace_id}
    for message in messages:
        header_trace, header_parent = message.headers["traceparent"].split("-")[1:3]
        assert header_trace == trace_id
        producer = ours[header_parent]
        assert (producer.kind, producer.parent_span_id) == (PRODUCER, charge.span_id)
        assert producer.name == f"{message.subject} publish"
    notified = next(tp for method, tp in orders.traceparents if method == "NotifyPaymentOutcome")
    notify_trace, notify_parent = notified.split("-")[1:3]
    assert notify_trace == trace_id
    client = ours[notify_parent]
    assert client.name == "orders.v1.OrderService/NotifyPaymentOutcome"
    assert (client.kind, client.parent_span_id) == (CLIENT, charge.span_id)
    get_order = next(tp for method, tp in orders.traceparents if method == "GetOrder")
    assert ours[get_order.split("-")[2]].name == "orders.v1.OrderService/GetOrder"
