"""W3C trace context leaves with every change (issue 11): a Charge made under a caller's
traceparent reaches the order service (GetOrder, then NotifyPaymentOutcome through the
outbox) and the NATS JetStream message headers in that same trace, and the envelope
records it. Real servers on port 0, the real NATS."""

from __future__ import annotations

import asyncio
import pathlib
import secrets
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext
from payments.v1 import events_pb2

from tests.conftest import make_settings
from tests.fake_order_service import FakeOrderService, order_service
from tests.helpers.builders import charge_request, keyed, order_id
from tests.helpers.nats import NATS_URL, WAIT_S, own_jetstream, read_all
from tests.helpers.servers import serving


@pytest.fixture
async def jetstream() -> AsyncIterator[tuple[JetStreamContext, str, str]]:
    async with own_jetstream() as running:
        yield running


@pytest.fixture
async def orders() -> AsyncIterator[tuple[FakeOrderService, int]]:
    async with order_service() as running:
        yield running


def trace_id_of(traceparent: str) -> str:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2)
    return trace_id


async def test_a_charges_trace_reaches_the_order_service_and_the_broker(
    database_url: str, tmp_path: pathlib.Path, jetstream, orders
) -> None:
    js, stream, prefix = jetstream
    fake, port = orders
    order = fake.add(order_id(), 10_000)
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    settings = make_settings(
        database_url, tmp_path, order_service_addr=f"127.0.0.1:{port}", nats_url=NATS_URL,
        order_service_timeout_seconds=10,  # room for a loaded machine
        nats_stream=stream, nats_subject_prefix=prefix,
    )  # fmt: skip
    async with serving(settings) as (app, stub):
        assert app.relay is not None
        metadata = (*keyed("traced-1"), ("traceparent", f"00-{trace_id}-{caller_span}-01"))
        request = charge_request(10_000, order_id=order.order_id)
        reply = await stub.Charge(request, metadata=metadata)
        # created, processing, captured on NATS; captured to the order service
        await asyncio.wait_for(app.relay.wait_until(lambda s: s.delivered >= 4), WAIT_S)
    messages = await read_all(js, stream, f"{prefix}.>", 3)
    assert {m.headers["Nats-Msg-Id"] for m in messages} == {
        f"{reply.payment.payment_id}:{sequence}" for sequence in (1, 2, 3)
    }
    for message in messages:
        event = events_pb2.PaymentEvent.FromString(message.data)
        assert event.trace.trace_id == trace_id
        assert trace_id_of(event.trace.traceparent) == trace_id
        assert trace_id_of(message.headers["traceparent"]) == trace_id
    seen = dict(fake.traceparents)
    assert set(seen) == {"GetOrder", "NotifyPaymentOutcome"}
    assert trace_id_of(seen["GetOrder"]) == trace_id
    assert trace_id_of(seen["NotifyPaymentOutcome"]) == trace_id


async def test_an_untraced_call_is_carried_in_the_trace_the_server_started(
    database_url: str, tmp_path: pathlib.Path, jetstream, orders
) -> None:
    """No traceparent from the caller: the server starts a trace, and every message carries it."""
    js, stream, prefix = jetstream
    fake, port = orders
    order = fake.add(order_id(), 10_000)
    settings = make_settings(
        database_url, tmp_path, order_service_addr=f"127.0.0.1:{port}", nats_url=NATS_URL,
        order_service_timeout_seconds=10,  # room for a loaded machine
        nats_stream=stream, nats_subject_prefix=prefix,
    )  # fmt: skip
    async with serving(settings) as (app, stub):
        assert app.relay is not None
        await stub.Charge(charge_request(10_000, order_id=order.order_id), metadata=keyed("t-2"))
        await asyncio.wait_for(app.relay.wait_until(lambda s: s.delivered >= 4), WAIT_S)
    messages = await read_all(js, stream, f"{prefix}.>", 3)
    trace_ids = {events_pb2.PaymentEvent.FromString(m.data).trace.trace_id for m in messages}
    assert len(trace_ids) == 1
    (trace_id,) = trace_ids
    assert {trace_id_of(m.headers["traceparent"]) for m in messages} == {trace_id}
    assert {trace_id_of(tp) for _, tp in fake.traceparents} == {trace_id}
