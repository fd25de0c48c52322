"""Payment events on the real NATS JetStream (127.0.0.1:4222): every event once in the
stream, on `<prefix>.<type>`, protobuf PaymentEvent with Nats-Msg-Id = dedupe id, also when
the relay delivers a message again. Each test has its own stream and subjects (uuid) and
deletes them."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from nats.js import JetStreamContext
from payments.v1 import events_pb2
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.db.tables import outbox, payment_events
from payment_grpc.bootstrap import Application
from tests.conftest import make_settings
from tests.fake_order_service import order_service
from tests.helpers.builders import charge_request, keyed, order_id
from tests.helpers.nats import NATS_URL, WAIT_S, own_jetstream, read_all
from tests.helpers.servers import serving


@pytest.fixture
async def jetstream() -> AsyncIterator[tuple[JetStreamContext, str, str]]:
    async with own_jetstream() as running:
        yield running


async def stored_events(app: Application) -> dict[str, tuple[int, str]]:
    """dedupe id -> (sequence, status) of every stored payment event."""
    async with app.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(
                payment_events.c.payment_id, payment_events.c.sequence, payment_events.c.status
            )
        )
        return {f"{p}:{s}": (s, status) for p, s, status in rows}


async def test_jetstream_gets_every_event_once_with_its_dedupe_id(
    database_url: str, tmp_path: pathlib.Path, jetstream
) -> None:
    js, stream, prefix = jetstream
    settings = make_settings(
        database_url, tmp_path, nats_url=NATS_URL, nats_stream=stream, nats_subject_prefix=prefix
    )
    async with serving(settings) as (app, stub):
        assert app.relay is not None
        payment = (await stub.Charge(charge_request(10_000), metadata=keyed("n1"))).payment
        refund = api.RefundRequest(
            payment_id=payment.payment_id, amount=pb.Money(currency="USD", amount_minor=2_500)
        )
        await stub.Refund(refund, metadata=keyed("n2"))
        expected = await stored_events(app)
        assert len(expected) == 4  # created, processing, captured, partially refunded
        await asyncio.wait_for(app.relay.wait_until(lambda s: s.delivered >= len(expected)), WAIT_S)
        # the relay delivers everything again, as after a crash before it marked them
        async with app.engine.begin() as conn:
            await conn.execute(outbox.update().values(state="pending", claimed_until=None))
        app.relay.wake()
        await asyncio.wait_for(
            app.relay.wait_until(lambda s: s.delivered >= 2 * len(expected)), WAIT_S
        )
    info = await js.stream_info(stream)
    assert info.state.messages == len(expected)  # JetStream dropped every redelivery
    messages = await read_all(js, stream, f"{prefix}.>", len(expected))
    by_id = {m.headers["Nats-Msg-Id"]: m for m in messages}
    assert set(by_id) == set(expected)
    for dedupe_id, message in by_id.items():
        event = events_pb2.PaymentEvent.FromString(message.data)
        assert event.event_id == dedupe_id
        assert message.subject == f"{prefix}.{event.type}"
        sequence, status = expected[dedupe_id]
        assert event.sequence == sequence
        assert pb.PaymentStatus.Name(event.payment.status) == f"PAYMENT_STATUS_{status}"
        assert event.payment.payment_id == payment.payment_id
        assert event.trace.trace_id
    types = sorted(events_pb2.PaymentEvent.FromString(m.data).type for m in messages)
    assert types == [
        "payment.captured",
        "payment.created",
        "payment.partially_refunded",
        "payment.processing",
    ]


async def test_events_wait_in_the_outbox_while_the_broker_is_unreachable(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(
        database_url, tmp_path, nats_url="nats://127.0.0.1:1", outbox_backoff_initial_seconds=0.01,
        outbox_backoff_max_seconds=0.05,
    )  # fmt: skip
    async with serving(settings) as (app, stub):
        assert app.relay is not None
        await stub.Charge(charge_request(10_000), metadata=keyed("n3"))
        await asyncio.wait_for(app.relay.wait_until(lambda s: s.failed >= 3), WAIT_S)
        async with app.engine.connect() as conn:
            states = (await conn.execute(sa.select(outbox.c.state, outbox.c.last_error))).all()
    assert {state for state, _ in states} == {"pending"}
    assert all("NATS unreachable" in error for _, error in states if error)


async def test_a_hanging_order_service_holds_back_no_other_delivery(
    database_url: str, tmp_path: pathlib.Path, jetstream
) -> None:
    """Each delivery runs on its own: while one notification hangs at the order service,
    the broker gets every event, including those of payments made afterwards."""
    js, stream, prefix = jetstream
    async with order_service() as (fake, port):
        fake.notifications_hanging = True
        orders = [fake.add(order_id(), 10_000) for _ in range(2)]
        settings = make_settings(
            database_url, tmp_path, nats_url=NATS_URL, nats_stream=stream,
            nats_subject_prefix=prefix, order_service_addr=f"127.0.0.1:{port}",
            order_service_timeout_seconds=120, order_service_attempts=1,
            outbox_lease_seconds=120,
        )  # fmt: skip
        async with serving(settings) as (app, stub):
            assert app.relay is not None
            first = charge_request(10_000, order_id=orders[0].order_id)
            await stub.Charge(first, metadata=keyed("h1"))
            await asyncio.wait_for(fake.wait_until(lambda: fake.hung_notifications >= 1), WAIT_S)
            second = charge_request(10_000, order_id=orders[1].order_id)
            await stub.Charge(second, metadata=keyed("h2"))
            messages = await read_all(js, stream, f"{prefix}.>", 6)  # 3 events x 2 payments
            assert fake.notifications == []  # the first notification still hangs
            fake.released.set()
            fake.notifications_hanging = False
            await asyncio.wait_for(fake.wait_for_notifications(2), WAIT_S)
    assert {events_pb2.PaymentEvent.FromString(m.data).payment.order_id for m in messages} == {
        order.order_id for order in orders
    }
