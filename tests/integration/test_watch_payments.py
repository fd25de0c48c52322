"""WatchPayments, the change feed: every payment event after an opaque cursor, in commit
order, filtered; resumed after a restart and across replicas with no gap and no
duplicate. Real servers on port 0 through the generated stub, both databases."""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from typing import Any

import grpc
import sqlalchemy as sa
from grpc import aio
from payments.v1 import payment_service_pb2 as api
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from payment_grpc.adapters.db.tables import payment_events
from payment_grpc.bootstrap import Application
from tests.conftest import make_settings
from tests.helpers.builders import charge_request, keyed
from tests.helpers.calls import rpc_error
from tests.helpers.credentials import client_metadata, token
from tests.helpers.servers import serving

WAIT_S = 30


def fresh_key() -> tuple[tuple[str, str], ...]:
    return keyed(uuid.uuid4().hex)


async def stored(app: Application) -> set[tuple[str, int]]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(sa.select(payment_events.c.payment_id, payment_events.c.sequence))
        return {(p, s) for p, s in rows}


async def take(call: Any, count: int) -> list[api.WatchPaymentsResponse]:
    return [await asyncio.wait_for(call.read(), WAIT_S) for _ in range(count)]


def ids(responses: list[api.WatchPaymentsResponse]) -> list[tuple[str, int]]:
    return [(r.event.payment.payment_id, r.event.sequence) for r in responses]


async def test_every_event_in_commit_order_then_live_ones(database_url, tmp_path) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        for _ in range(3):
            await stub.Charge(charge_request(), metadata=fresh_key())
        before = await stored(app)
        call = stub.WatchPayments(api.WatchPaymentsRequest())
        first = await take(call, len(before))
        assert set(ids(first)) == before
        assert len(set(ids(first))) == len(first)
        for payment_id in {p for p, _ in before}:
            sequences = [s for p, s in ids(first) if p == payment_id]
            assert sequences == [1, 2, 3]
        # live: a new charge reaches the open stream
        reply = await stub.Charge(charge_request(), metadata=fresh_key())
        live = await take(call, 3)
        assert ids(live) == [(reply.payment.payment_id, s) for s in (1, 2, 3)]
        assert [r.event.type for r in live] == [
            "payment.created",
            "payment.processing",
            "payment.captured",
        ]
        assert live[-1].event.payment.status == pb.PAYMENT_STATUS_CAPTURED
        call.cancel()


async def test_filters_by_order_customer_and_status(database_url, tmp_path) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (_, stub):
        mine = await stub.Charge(charge_request(customer_id="cus_a"), metadata=fresh_key())
        await stub.Charge(charge_request(customer_id="cus_b"), metadata=fresh_key())
        by_customer = stub.WatchPayments(api.WatchPaymentsRequest(customer_id="cus_a"))
        assert {p for p, _ in ids(await take(by_customer, 3))} == {mine.payment.payment_id}
        by_customer.cancel()
        by_order = stub.WatchPayments(api.WatchPaymentsRequest(order_id=mine.payment.order_id))
        assert ids(await take(by_order, 3)) == [(mine.payment.payment_id, s) for s in (1, 2, 3)]
        by_order.cancel()
        captured = stub.WatchPayments(
            api.WatchPaymentsRequest(statuses=[pb.PAYMENT_STATUS_CAPTURED])
        )
        got = await take(captured, 2)
        assert {r.event.payment.status for r in got} == {pb.PAYMENT_STATUS_CAPTURED}
        captured.cancel()


async def test_a_customer_token_sees_only_its_own(database_url, tmp_path) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        mine = await stub.Charge(charge_request(customer_id="cus_me"), metadata=fresh_key())
        await stub.Charge(charge_request(customer_id="cus_other"), metadata=fresh_key())
        customer = token(("payments.read",), customer_id="cus_me")
        async with aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata(customer, keys=False)
        ) as channel:
            theirs = payment_service_pb2_grpc.PaymentServiceStub(channel)
            call = theirs.WatchPayments(api.WatchPaymentsRequest())
            assert {p for p, _ in ids(await take(call, 3))} == {mine.payment.payment_id}
            call.cancel()
            other = theirs.WatchPayments(api.WatchPaymentsRequest(customer_id="cus_other"))
            error = await rpc_error(other.read())
            assert error.code == grpc.StatusCode.PERMISSION_DENIED
        no_scope = token(("payments.charge",))
        async with aio.insecure_channel(
            f"127.0.0.1:{app.port}", interceptors=client_metadata(no_scope, keys=False)
        ) as channel:
            call = payment_service_pb2_grpc.PaymentServiceStub(channel).WatchPayments(
                api.WatchPaymentsRequest()
            )
            assert (await rpc_error(call.read())).code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_cursor_that_is_not_one_is_invalid_argument(database_url, tmp_path) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (_, stub):
        call = stub.WatchPayments(api.WatchPaymentsRequest(cursor="not-a-cursor"))
        error = await rpc_error(call.read())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "INVALID_CURSOR"


async def test_resumed_after_a_restart_sees_every_event_exactly_once(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(database_url, tmp_path)
    seen: list[tuple[str, int]] = []
    async with serving(settings) as (_, stub):
        for _ in range(2):
            await stub.Charge(charge_request(manual=True), metadata=fresh_key())
        call = stub.WatchPayments(api.WatchPaymentsRequest())
        got = await take(call, 4)  # 2 of the 6 events are left unread
        seen += ids(got)
        cursor = got[-1].cursor
        call.cancel()
    async with serving(settings) as (app, stub):  # the server restarted
        for _ in range(2):
            await stub.Charge(charge_request(), metadata=fresh_key())
        expected = await stored(app)
        call = stub.WatchPayments(api.WatchPaymentsRequest(cursor=cursor))
        seen += ids(await take(call, len(expected) - 4))
        call.cancel()
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == expected


async def test_two_replicas_writing_while_a_third_follows(database_url, tmp_path) -> None:
    one = make_settings(database_url, tmp_path / "a", instance_id="a")
    two = make_settings(database_url, tmp_path / "b", instance_id="b")
    async with serving(one) as (app, stub_a), serving(two) as (_, stub_b):
        call = stub_a.WatchPayments(api.WatchPaymentsRequest())
        await asyncio.gather(
            *(stub.Charge(charge_request(), metadata=fresh_key()) for stub in (stub_a, stub_b) * 5)
        )
        expected = await stored(app)
        got = await take(call, len(expected))
        call.cancel()
        cursors = [r.cursor for r in got]
    assert len(set(ids(got))) == len(got) == len(expected) == 30
    assert set(ids(got)) == expected
    assert len(set(cursors)) == len(cursors)


async def test_a_consumer_that_stops_reading_is_cut_and_resumes_from_its_cursor(
    database_url, tmp_path
) -> None:
    rows = 300  # 100 KB each: far more than the stream's flow-control window
    settings = make_settings(database_url, tmp_path, watch_send_timeout_seconds=0.5)
    async with serving(settings) as (app, stub):
        await insert_big_feed_rows(app, rows)
        stalled = stub.WatchPayments(api.WatchPaymentsRequest())
        assert app.servicer is not None
        await asyncio.wait_for(stalled.wait_for_connection(), WAIT_S)
        # the stalled consumer reads nothing until the server has cut it
        await asyncio.wait_for(app.servicer.wait_for_cuts(1), WAIT_S)
        received: list[api.WatchPaymentsResponse] = []
        async for response in stalled_messages(stalled):
            received.append(response)
        assert await stalled.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0 < len(received) < rows
        # others are not held up, and the cut consumer resumes with no gap
        resumed = stub.WatchPayments(api.WatchPaymentsRequest(cursor=received[-1].cursor))
        rest = await take(resumed, rows - len(received))
        resumed.cancel()
    sequences = [r.event.sequence for r in received + rest]
    assert sequences == list(range(1, rows + 1))


async def stalled_messages(call: Any) -> Any:
    while True:
        try:
            response = await call.read()
        except grpc.aio.AioRpcError:
            return
        if response is grpc.aio.EOF:
            return
        yield response


async def insert_big_feed_rows(app: Application, count: int) -> None:
    from datetime import UTC, datetime

    from payments.v1 import events_pb2

    from payment_grpc.adapters.db.tables import payment_feed

    now = datetime.now(UTC)
    big = "x" * 100_000
    payload = [
        events_pb2.PaymentEvent(
            event_id=f"pay_big:{n}",
            type="payment.processing",
            sequence=n,
            payment=pb.Payment(payment_id="pay_big", description=big),
        ).SerializeToString()
        for n in range(1, count + 1)
    ]
    async with app.engine.begin() as conn:
        await conn.execute(
            payment_feed.insert(),
            [
                {
                    "position": 10**9 + n,
                    "payment_id": "pay_big",
                    "sequence": n,
                    "order_id": "o",
                    "customer_id": "",
                    "status": "PROCESSING",
                    "payload": payload[n - 1],
                    "created_at": now,
                }
                for n in range(1, count + 1)
            ],
        )
