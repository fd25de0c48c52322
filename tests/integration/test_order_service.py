"""Charge checks the order at the order service first: a fake order service that is a real
grpc.aio server, the payment service a real server, calls through the generated stub."""

from __future__ import annotations

import asyncio
import pathlib
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from purgatory.domain import model as breaker_model

from payment_grpc.config import Settings
from tests.conftest import make_settings
from tests.fake_order_service import FakeOrderService, order_service
from tests.helpers.builders import charge_request, keyed, order_id
from tests.helpers.calls import rpc_error
from tests.helpers.db import row_counts
from tests.helpers.servers import serving


def fresh_key() -> tuple[tuple[str, str], ...]:
    return keyed(uuid.uuid4().hex)


@pytest.fixture
async def orders() -> AsyncIterator[tuple[FakeOrderService, int]]:
    async with order_service() as running:
        yield running


@pytest.fixture
def start(
    database_url: str, tmp_path: pathlib.Path, orders: tuple[FakeOrderService, int]
) -> Callable[..., Any]:
    _, port = orders

    def settings(**overrides: object) -> Settings:
        return make_settings(
            database_url, tmp_path, order_service_addr=f"127.0.0.1:{port}", **overrides
        )

    return lambda **overrides: serving(settings(**overrides))


async def test_a_charge_matching_a_payable_order_goes_through(start, orders) -> None:
    fake, _ = orders
    order = fake.add(order_id(), 10_000)
    async with start() as (_, stub):
        reply = await stub.Charge(
            charge_request(10_000, order_id=order.order_id), metadata=keyed("k1")
        )
    assert reply.payment.order_id == order.order_id
    assert fake.get_calls == 1


async def test_an_unknown_order_is_not_found_and_that_is_the_keys_answer(start, orders) -> None:
    fake, _ = orders
    async with start() as (app, stub):
        request = charge_request(order_id="ord_nobody_knows")
        error = await rpc_error(stub.Charge(request, metadata=keyed("k-unknown")))
        assert error.code == grpc.StatusCode.NOT_FOUND
        assert error.info.reason == "ORDER_NOT_FOUND"
        assert error.info.metadata["orderId"] == "ord_nobody_knows"
        again = await rpc_error(stub.Charge(request, metadata=keyed("k-unknown")))
        assert again.code == grpc.StatusCode.NOT_FOUND
        assert fake.get_calls == 1  # a definite answer is stored: replayed, not asked again
        assert (await row_counts(app))["payments"] == 0


async def test_an_order_that_cannot_be_paid_is_refused(start, orders) -> None:
    fake, _ = orders
    order = fake.add(order_id(), 10_000, payable=False)
    async with start() as (app, stub):
        error = await rpc_error(
            stub.Charge(charge_request(order_id=order.order_id), metadata=fresh_key())
        )
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.info.reason == "ORDER_NOT_PAYABLE"
        assert (await row_counts(app))["payments"] == 0


@pytest.mark.parametrize(
    ("amount", "currency"), [(9_999, "USD"), (10_000, "EUR")], ids=["amount", "currency"]
)
async def test_an_amount_or_currency_other_than_the_orders_is_a_mismatch(
    start, orders, amount, currency
) -> None:
    fake, _ = orders
    order = fake.add(order_id(), 10_000)
    async with start() as (app, stub):
        request = charge_request(amount, order_id=order.order_id, currency=currency)
        error = await rpc_error(stub.Charge(request, metadata=fresh_key()))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.info.reason == "ORDER_MISMATCH"
        assert error.info.metadata["expectedCurrency"] == "USD"
        assert error.info.metadata["expectedAmountMinor"] == "10000"
        assert (await row_counts(app))["payments"] == 0


async def test_another_customers_order_is_a_mismatch(start, orders) -> None:
    fake, _ = orders
    order = fake.add(order_id(), 10_000, customer_id="cus_owner")
    async with start() as (_, stub):
        request = charge_request(order_id=order.order_id, customer_id="cus_someone_else")
        error = await rpc_error(stub.Charge(request, metadata=fresh_key()))
        assert error.info.reason == "ORDER_MISMATCH"
        assert error.info.metadata["expectedCustomerId"] == "cus_owner"


async def test_an_unreachable_order_service_is_retryable_and_not_the_keys_answer(
    start, orders
) -> None:
    fake, _ = orders
    order = fake.add(order_id(), 10_000)
    fake.down = True
    async with start(order_service_attempts=2) as (app, stub):
        request = charge_request(order_id=order.order_id)
        error = await rpc_error(stub.Charge(request, metadata=keyed("k-down")))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.info.reason == "ORDER_SERVICE_UNAVAILABLE"
        assert error.has_retry
        assert fake.get_calls == 2  # UNAVAILABLE is transient: retried once, then given up
        assert (await row_counts(app))["payments"] == 0
        fake.down = False
        reply = await stub.Charge(request, metadata=keyed("k-down"))  # runs again
        assert reply.payment.order_id == order.order_id


async def test_a_hanging_order_service_never_outlives_the_callers_deadline(start, orders) -> None:
    fake, _ = orders
    order = fake.add(order_id(), 10_000)
    fake.hanging = True
    async with start(order_service_timeout_seconds=30) as (app, stub):
        request = charge_request(order_id=order.order_id)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Charge(request, timeout=0.5, metadata=fresh_key())
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        # the order service was asked with what was left of the caller's 0.5 s, not 30 s
        assert fake.deadlines_seen
        assert all(d is not None and d <= 0.5 for d in fake.deadlines_seen)
        assert (await row_counts(app))["payments"] == 0


async def test_a_hanging_order_service_hits_its_own_timeout(start, orders) -> None:
    fake, _ = orders
    order = fake.add(order_id(), 10_000)
    fake.hanging = True
    async with start(order_service_timeout_seconds=0.2, order_service_attempts=2) as (_, stub):
        error = await asyncio.wait_for(
            rpc_error(stub.Charge(charge_request(order_id=order.order_id), metadata=fresh_key())),
            10,
        )
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.info.reason == "ORDER_SERVICE_UNAVAILABLE"
    assert fake.get_calls == 2  # DEADLINE_EXCEEDED is transient: retried


class _Clock:
    """purgatory's view of the time (it reads time.time()): moved only by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


async def test_the_breaker_opens_answers_at_once_and_a_probe_closes_it(
    start, orders, monkeypatch
) -> None:
    fake, _ = orders
    clock = _Clock()
    monkeypatch.setattr(breaker_model, "time", types.SimpleNamespace(time=clock.time))
    order = fake.add(order_id(), 10_000)
    fake.down = True
    settings = {
        "order_service_attempts": 1,
        "order_service_breaker_threshold": 3,
        "order_service_breaker_reset_seconds": 30,
    }
    async with start(**settings) as (_, stub):

        async def charge() -> Awaitable[Any]:
            return stub.Charge(charge_request(order_id=order.order_id), metadata=fresh_key())

        for _ in range(3):
            await rpc_error(await charge())
        assert fake.get_calls == 3
        error = await rpc_error(await charge())  # open: refused without asking
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.info.reason == "ORDER_SERVICE_UNAVAILABLE"
        assert error.has_retry
        assert fake.get_calls == 3
        fake.down = False
        await rpc_error(await charge())  # still open: the service's recovery is not seen yet
        assert fake.get_calls == 3
        clock.now += 31  # half-open: the next call is a probe
        reply = await (await charge())
        assert reply.payment.order_id == order.order_id
        assert fake.get_calls == 4
        second = fake.add(order_id(), 10_000)
        await stub.Charge(
            charge_request(order_id=second.order_id), metadata=fresh_key()
        )  # closed again
        assert fake.get_calls == 5


async def test_without_an_order_service_charges_are_not_checked(settings: Settings) -> None:
    async with serving(settings) as (_, stub):
        reply = await stub.Charge(charge_request(), metadata=keyed("k-plain"))
    assert reply.payment.payment_id
