"""Saga participation on the real NATS JetStream: `inventory.v1.reserved` events are charged
once per event id, whatever is delivered, and answered through the outbox with
`payment.completed` / `payment.failed`. Each test has its own streams and subjects."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from inventory.v1 import inventory_events_pb2 as inventory
from nats.js import JetStreamContext
from payments.v1 import events_pb2
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.db.tables import idempotency_keys, outbox, payments
from payment_grpc.bootstrap import Application
from payment_grpc.service.saga import Verdict
from tests.conftest import make_settings
from tests.fake_order_service import order_service
from tests.helpers.builders import card, order_id, usd
from tests.helpers.nats import NATS_URL, WAIT_S, own_jetstream, read_all
from tests.helpers.servers import serving


@pytest.fixture
async def broker() -> AsyncIterator[tuple[JetStreamContext, dict[str, Any]]]:
    """JetStream, and the settings of a service consuming a saga stream of the test's own."""
    async with own_jetstream() as (js, stream, prefix):
        suffix = uuid.uuid4().hex[:12]
        names = {
            "nats_url": NATS_URL,
            "nats_stream": stream,
            "nats_subject_prefix": prefix,
            "saga_consume": True,
            "saga_stream": f"INVENTORY_T{suffix}",
            "saga_subject": f"t{suffix}.inventory.v1.reserved",
            "saga_durable": f"saga-t{suffix}",
            "saga_retry_delay_seconds": 0.05,
        }
        try:
            yield js, names
        finally:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(names["saga_stream"])


def reserved(token: str = "tok_visa", amount: int = 10_000) -> inventory.InventoryReserved:
    return inventory.InventoryReserved(
        event_id=f"evt_{uuid.uuid4().hex}",
        order_id=order_id(),
        customer_id="cus_saga",
        amount=usd(amount),
        payment_method=card(token),
        capture_method=pb.CAPTURE_METHOD_AUTOMATIC,
    )


@contextlib.asynccontextmanager
async def consuming(
    database_url: str, tmp_path: pathlib.Path, names: dict[str, Any]
) -> AsyncIterator[Application]:
    async with serving(make_settings(database_url, tmp_path, **names)) as (app, _):
        assert app.saga is not None
        assert app.relay is not None
        await asyncio.wait_for(app.saga.subscribed.wait(), WAIT_S)
        yield app


def asking_once(names: dict[str, Any], port: int) -> dict[str, Any]:
    """The settings with the order service on `port`, asked once per delivery and never
    cut off by the breaker: each delivery meets the service as it is."""
    return {
        **names,
        "order_service_addr": f"127.0.0.1:{port}",
        "order_service_attempts": 1,
        "order_service_breaker_threshold": 1000,
    }


async def payments_of(app: Application, order: str) -> list[tuple[str, str]]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(payments.c.id, payments.c.status).where(payments.c.order_id == order)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def test_an_event_delivered_three_times_is_one_payment_and_one_completed_event(
    database_url: str, tmp_path: pathlib.Path, broker
) -> None:
    js, names = broker
    event = reserved()
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    async with consuming(database_url, tmp_path, names) as app:
        assert app.saga is not None
        assert app.relay is not None
        for _ in range(3):  # no Nats-Msg-Id: JetStream keeps all three
            await js.publish(names["saga_subject"], event.SerializeToString(), headers=headers)
        await asyncio.wait_for(
            app.saga.wait_until(lambda settled: settled[Verdict.DONE] >= 3), WAIT_S
        )
        # created, processing, captured, completed
        await asyncio.wait_for(app.relay.wait_until(lambda s: s.delivered >= 4), WAIT_S)
        charged = await payments_of(app, event.order_id)
        async with app.engine.connect() as conn:
            keys = (await conn.execute(sa.select(idempotency_keys.c.key))).scalars().all()
    assert len(charged) == 1
    (payment_id, status), = charged  # fmt: skip
    assert status == "CAPTURED"
    assert keys == [f"inventory:{event.event_id}"]
    info = await js.stream_info(names["nats_stream"])
    assert info.state.messages == 4
    messages = await read_all(js, names["nats_stream"], f"{names['nats_subject_prefix']}.>", 4)
    published = [events_pb2.PaymentEvent.FromString(m.data) for m in messages]
    assert sorted(e.type for e in published) == [
        "payment.captured",
        "payment.completed",
        "payment.created",
        "payment.processing",
    ]
    (completed,) = (
        (m, e) for m, e in zip(messages, published, strict=True) if e.type == "payment.completed"
    )
    message, envelope = completed
    assert message.subject == f"{names['nats_subject_prefix']}.payment.completed"
    assert message.headers["Nats-Msg-Id"] == envelope.event_id == f"{payment_id}:3:completed"
    assert envelope.payment.order_id == event.order_id
    assert envelope.payment.metadata["inventory_event_id"] == event.event_id
    assert envelope.payment.status == pb.PAYMENT_STATUS_CAPTURED
    # the checkout's trace goes on through the payment and its events
    assert envelope.trace.trace_id == trace_id
    assert message.headers["traceparent"].split("-")[1] == trace_id


async def test_a_declined_card_is_answered_with_payment_failed(
    database_url: str, tmp_path: pathlib.Path, broker
) -> None:
    js, names = broker
    event = reserved("tok_chargeDeclined")
    async with consuming(database_url, tmp_path, names) as app:
        assert app.saga is not None
        assert app.relay is not None
        await js.publish(names["saga_subject"], event.SerializeToString())
        await asyncio.wait_for(app.saga.wait_until(lambda s: s[Verdict.DONE] >= 1), WAIT_S)
        await asyncio.wait_for(app.relay.wait_until(lambda s: s.delivered >= 3), WAIT_S)
        charged = await payments_of(app, event.order_id)
    assert [status for _, status in charged] == ["FAILED"]
    messages = await read_all(js, names["nats_stream"], f"{names['nats_subject_prefix']}.>", 3)
    types = sorted(events_pb2.PaymentEvent.FromString(m.data).type for m in messages)
    assert types == ["payment.created", "payment.failed", "payment.processing"]
    assert (await js.stream_info(names["nats_stream"])).state.messages == 3


async def test_a_message_that_can_never_be_charged_is_dropped(
    database_url: str, tmp_path: pathlib.Path, broker
) -> None:
    js, names = broker
    negative = reserved(amount=-5)
    async with consuming(database_url, tmp_path, names) as app:
        assert app.saga is not None
        await js.publish(names["saga_subject"], b"\xff\xffnot protobuf")
        await js.publish(names["saga_subject"], negative.SerializeToString())
        await asyncio.wait_for(app.saga.wait_until(lambda s: s[Verdict.REJECTED] >= 2), WAIT_S)
        assert await payments_of(app, negative.order_id) == []
    assert app.saga.settled[Verdict.DONE] == 0


async def test_an_event_that_cannot_be_charged_now_comes_back_until_it_is(
    database_url: str, tmp_path: pathlib.Path, broker
) -> None:
    """Order service down: nothing is stored, the message is not acknowledged but delivered
    again; once the order service answers, the event is charged once."""
    js, names = broker
    event = reserved()
    async with order_service() as (orders, port):
        orders.add(event.order_id, 10_000, customer_id="cus_saga")
        orders.down = True
        names = asking_once(names, port)
        async with consuming(database_url, tmp_path, names) as app:
            assert app.saga is not None
            await js.publish(names["saga_subject"], event.SerializeToString())
            await asyncio.wait_for(app.saga.wait_until(lambda s: s[Verdict.RETRY] >= 2), WAIT_S)
            assert await payments_of(app, event.order_id) == []
            orders.down = False
            await asyncio.wait_for(app.saga.wait_until(lambda s: s[Verdict.DONE] >= 1), WAIT_S)
            charged = await payments_of(app, event.order_id)
    assert [status for _, status in charged] == ["CAPTURED"]
    assert app.saga.settled[Verdict.DONE] == 1


async def outbox_rows(app: Application) -> list[tuple[str, str, str]]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(sa.select(outbox.c.sink, outbox.c.dedupe_id, outbox.c.event_type))
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def published_refusal(
    js: JetStreamContext, names: dict[str, Any], event: inventory.InventoryReserved
) -> events_pb2.PaymentEvent:
    """The one message of the payments stream: `payment.failed` without a payment."""
    assert (await js.stream_info(names["nats_stream"])).state.messages == 1
    (message,) = await read_all(js, names["nats_stream"], f"{names['nats_subject_prefix']}.>", 1)
    assert message.subject == f"{names['nats_subject_prefix']}.payment.failed"
    envelope = events_pb2.PaymentEvent.FromString(message.data)
    assert message.headers["Nats-Msg-Id"] == envelope.event_id
    assert envelope.event_id == f"inventory:{event.event_id}:failed"
    assert envelope.type == "payment.failed"
    assert not envelope.HasField("payment")
    assert envelope.sequence == 0
    assert envelope.refusal.order_id == event.order_id
    assert envelope.refusal.inventory_event_id == event.event_id
    return envelope


async def delivered_refusal(
    app: Application,
    js: JetStreamContext,
    names: dict[str, Any],
    event: inventory.InventoryReserved,
    times: int,
    verdict: Verdict,
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """Publish `event` `times` times; once every delivery is settled with `verdict` and the
    relay has delivered, the outbox rows and the order's payments."""
    assert app.saga is not None
    assert app.relay is not None
    for _ in range(times):
        await js.publish(names["saga_subject"], event.SerializeToString())
    await asyncio.wait_for(app.saga.wait_until(lambda s: s[verdict] >= times), WAIT_S)
    await asyncio.wait_for(app.relay.wait_until(lambda s: s.delivered >= 1), WAIT_S)
    return await outbox_rows(app), await payments_of(app, event.order_id)


async def test_an_unknown_order_delivered_three_times_is_one_payment_failed_and_no_payment(
    database_url: str, tmp_path: pathlib.Path, broker
) -> None:
    """Order service down first (retryable: nothing stored, nothing published, delivered
    again); then it answers that the order is unknown: a definite refusal, published once as
    `payment.failed` (reason ORDER_NOT_FOUND) for the three deliveries, to the broker only."""
    js, names = broker
    event = reserved()
    async with order_service() as (orders, port):
        orders.down = True
        names = asking_once(names, port)
        async with consuming(database_url, tmp_path, names) as app:
            assert app.saga is not None
            assert app.relay is not None
            for _ in range(3):  # no Nats-Msg-Id: JetStream keeps all three
                await js.publish(names["saga_subject"], event.SerializeToString())
            await asyncio.wait_for(app.saga.wait_until(lambda s: s[Verdict.RETRY] >= 3), WAIT_S)
            assert await outbox_rows(app) == []
            orders.down = False
            await asyncio.wait_for(app.saga.wait_until(lambda s: s[Verdict.DONE] >= 3), WAIT_S)
            await asyncio.wait_for(app.relay.wait_until(lambda s: s.delivered >= 1), WAIT_S)
            rows = await outbox_rows(app)
            charged = await payments_of(app, event.order_id)
            delivered = app.relay.stats.delivered
        assert orders.notifications == []
    assert charged == []
    assert rows == [("broker", f"inventory:{event.event_id}:failed", "payment.failed")]
    assert delivered == 1
    envelope = await published_refusal(js, names, event)
    assert envelope.refusal.reason == "ORDER_NOT_FOUND"


async def test_an_order_mismatch_is_one_payment_failed_and_no_payment(
    database_url: str, tmp_path: pathlib.Path, broker
) -> None:
    js, names = broker
    event = reserved(amount=10_000)
    async with order_service() as (orders, port):
        orders.add(event.order_id, 12_345, customer_id="cus_saga")
        names = {**names, "order_service_addr": f"127.0.0.1:{port}"}
        async with consuming(database_url, tmp_path, names) as app:
            rows, charged = await delivered_refusal(app, js, names, event, 3, Verdict.DONE)
    assert charged == []
    assert len(rows) == 1
    envelope = await published_refusal(js, names, event)
    assert envelope.refusal.reason == "ORDER_MISMATCH"


async def test_an_invalid_event_is_dropped_with_one_payment_failed(
    database_url: str, tmp_path: pathlib.Path, broker
) -> None:
    """Content that breaks the Charge request's rules: never charged, answered once."""
    js, names = broker
    negative = reserved(amount=-5)
    async with consuming(database_url, tmp_path, names) as app:
        rows, charged = await delivered_refusal(app, js, names, negative, 2, Verdict.REJECTED)
    assert charged == []
    assert len(rows) == 1
    envelope = await published_refusal(js, names, negative)
    assert envelope.refusal.reason == "INVALID_ARGUMENT"
    assert "amount" in envelope.refusal.message
