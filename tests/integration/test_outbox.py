"""The transactional outbox and its relay against real peers: a fake order service that is a
real grpc.aio server (NotifyPaymentOutcome), the payment service a real server, both
databases. Every wait awaits what the order service received; nothing sleeps."""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.db.outbox import SqlOutboxStore
from payment_grpc.adapters.db.tables import outbox, payment_events
from payment_grpc.bootstrap import Application
from payment_grpc.config import Settings
from payment_grpc.service.outbox import OUTCOME_TYPES
from tests.conftest import make_settings
from tests.fake_order_service import FakeOrderService, order_service
from tests.helpers.builders import charge_request, keyed, order_id
from tests.helpers.servers import serving

OUTCOME_STATUSES = {name.removeprefix("payment.").upper() for name in OUTCOME_TYPES}
WAIT_S = 30


def fresh_key() -> tuple[tuple[str, str], ...]:
    return keyed(uuid.uuid4().hex)


@pytest.fixture
async def orders() -> AsyncIterator[tuple[FakeOrderService, int]]:
    async with order_service() as running:
        yield running


def relay_settings(database_url: str, tmp_path: pathlib.Path, port: int, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "order_service_addr": f"127.0.0.1:{port}",
        "order_service_attempts": 1,
        "order_service_breaker_threshold": 1000,  # these tests are about the outbox
        "outbox_backoff_initial_seconds": 0.01,
        "outbox_backoff_max_seconds": 0.05,
        "outbox_max_attempts": 1000,
        **extra,
    }
    return make_settings(database_url, tmp_path, **values)


async def outcome_events(app: Application) -> set[tuple[str, int]]:
    """(payment id, sequence) of every stored event the order service must hear about."""
    async with app.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(payment_events.c.payment_id, payment_events.c.sequence).where(
                payment_events.c.status.in_(OUTCOME_STATUSES),
                payment_events.c.previous_status.is_not(None),
            )
        )
        return {(payment_id, sequence) for payment_id, sequence in rows}


async def outbox_states(app: Application) -> Counter[str]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(sa.select(outbox.c.state))
        return Counter(state for (state,) in rows)


async def lifecycle(stub: Any, fake: FakeOrderService) -> str:
    """Authorize, capture, refund partly then fully: four outcomes for one payment."""
    order = fake.add(order_id(), 10_000)
    request = charge_request(10_000, order_id=order.order_id, manual=True)
    payment = (await stub.Charge(request, metadata=fresh_key())).payment
    await stub.CapturePayment(
        api.CapturePaymentRequest(payment_id=payment.payment_id), metadata=fresh_key()
    )
    for amount in (4_000, 6_000):
        await stub.Refund(
            api.RefundRequest(
                payment_id=payment.payment_id, amount=pb.Money(currency="USD", amount_minor=amount)
            ),
            metadata=fresh_key(),
        )
    return str(payment.payment_id)


def assert_in_order_per_payment(delivered: list[tuple[str, int]]) -> None:
    last: dict[str, int] = {}
    for payment_id, sequence in delivered:
        assert sequence >= last.get(payment_id, 0), f"{payment_id}: {sequence} after {last}"
        last[payment_id] = sequence


async def test_every_outcome_reaches_the_order_service_with_its_status(
    database_url, tmp_path, orders
) -> None:
    fake, port = orders
    async with serving(relay_settings(database_url, tmp_path, port)) as (app, stub):
        payment_id = await lifecycle(stub, fake)
        await asyncio.wait_for(fake.wait_for_notifications(4), WAIT_S)
        assert await outcome_events(app) == set(fake.delivered())
    statuses = [(n.payment_id, n.sequence, n.status) for n in fake.notifications]
    assert [s for _, _, s in statuses] == [
        pb.PAYMENT_STATUS_AUTHORIZED,
        pb.PAYMENT_STATUS_CAPTURED,
        pb.PAYMENT_STATUS_PARTIALLY_REFUNDED,
        pb.PAYMENT_STATUS_REFUNDED,
    ]
    assert {p for p, _, _ in statuses} == {payment_id}
    assert all(n.order_id for n in fake.notifications)


async def test_a_declined_charge_is_notified_as_failed(database_url, tmp_path, orders) -> None:
    fake, port = orders
    order = fake.add(order_id(), 10_000)
    async with serving(relay_settings(database_url, tmp_path, port)) as (_, stub):
        request = charge_request(
            10_000,
            order_id=order.order_id,
            method=pb.PaymentMethod(card=pb.CardMethod(token="tok_chargeDeclined")),
        )
        await stub.Charge(request, metadata=fresh_key())
        await asyncio.wait_for(fake.wait_for_notifications(1), WAIT_S)
    assert fake.notifications[0].status == pb.PAYMENT_STATUS_FAILED


async def test_an_order_service_down_for_a_while_gets_everything_in_order_once_back(
    database_url, tmp_path, orders
) -> None:
    fake, port = orders
    fake.notifications_down = True
    async with serving(relay_settings(database_url, tmp_path, port)) as (app, stub):
        await asyncio.gather(*(lifecycle(stub, fake) for _ in range(4)))
        expected = await outcome_events(app)
        assert len(expected) == 16
        # down "for a while": every message refused at least twice, none delivered
        await asyncio.wait_for(fake.wait_until(lambda: fake.refused_notifications >= 40), WAIT_S)
        assert fake.notifications == []
        fake.notifications_down = False
        await asyncio.wait_for(fake.wait_until(lambda: set(fake.delivered()) >= expected), WAIT_S)
        assert set(fake.delivered()) == expected  # after dedupe: each outcome, nothing else
        assert_in_order_per_payment(fake.delivered())


def first_arrivals(delivered: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """What a receiver that drops repeated dedupe ids keeps, in arrival order."""
    seen: set[tuple[str, int]] = set()
    kept = []
    for item in delivered:
        if item not in seen:
            seen.add(item)
            kept.append(item)
    return kept


async def test_parked_after_max_attempts_listed_and_retried_by_the_cli(
    database_url, tmp_path, orders
) -> None:
    fake, port = orders
    fake.notifications_down = True
    settings = relay_settings(database_url, tmp_path, port, outbox_max_attempts=2)
    async with serving(settings) as (app, stub):
        assert app.relay is not None
        payment_id = await lifecycle(stub, fake)
        await asyncio.wait_for(app.relay.wait_until(lambda s: s.parked >= 1), WAIT_S)
        listed = await cli(database_url, "outbox", "list")
        parked = [line.split("\t") for line in listed.splitlines() if "\tparked\t" in line]
        assert parked[0][1:5] == ["orders", f"{payment_id}:3", "payment.authorized", "parked"]
        assert "OrderServiceUnavailable" in parked[0][7] or "SinkUnavailable" in parked[0][7]
        # the parked first outcome holds back the later ones of its payment
        assert fake.notifications == []
        fake.notifications_down = False
        retried = await cli(database_url, "outbox", "retry")
        assert retried.startswith(f"{len(parked)} parked")
        app.relay.wake()
        await asyncio.wait_for(fake.wait_for_notifications(4), WAIT_S)
    assert [seq for _, seq in first_arrivals(fake.delivered())] == [3, 4, 5, 6]


async def cli(database_url: str, *args: str) -> str:
    import os
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payment_grpc", *args,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_two_replicas_relaying_deliver_each_dedupe_id_once(
    database_url, tmp_path, orders
) -> None:
    fake, port = orders
    one = relay_settings(database_url, tmp_path / "a", port, instance_id="replica-a")
    two = relay_settings(database_url, tmp_path / "b", port, instance_id="replica-b")
    async with serving(one) as (app, stub_a), serving(two) as (_, stub_b):
        await asyncio.gather(*(lifecycle(stub, fake) for stub in (stub_a, stub_b) * 3))
        expected = await outcome_events(app)
        assert len(expected) == 24
        await asyncio.wait_for(fake.wait_until(lambda: set(fake.delivered()) >= expected), WAIT_S)
    delivered = Counter(fake.delivered())
    assert set(delivered) == expected
    assert max(delivered.values()) == 1  # no crash here, so not even a duplicate
    assert_in_order_per_payment(fake.delivered())


async def test_the_backlog_per_sink_is_what_the_metrics_show(
    database_url, tmp_path, orders
) -> None:
    """payments.outbox.lag / .parked come from SqlOutboxStore.backlog: per sink, when its
    oldest pending message was written, and how many are parked."""
    fake, port = orders
    fake.notifications_down = True
    settings = relay_settings(database_url, tmp_path, port, outbox_max_attempts=1)
    async with serving(settings) as (app, stub):
        assert app.relay is not None
        await lifecycle(stub, fake)
        await asyncio.wait_for(app.relay.wait_until(lambda s: s.parked >= 1), WAIT_S)
        store = SqlOutboxStore(app.engine)
        backlog = await store.backlog()
        async with app.engine.connect() as conn:
            rows = (await conn.execute(sa.select(outbox.c.state, outbox.c.created_at))).all()
    oldest_pending = min(created for state, created in rows if state == "pending")
    parked = sum(state == "parked" for state, _ in rows)
    assert parked == 1  # the first outcome; it holds back the later ones
    assert backlog == {"orders": (oldest_pending, parked)}
