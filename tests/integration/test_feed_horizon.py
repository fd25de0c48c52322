"""WatchPayments on PostgreSQL when event-writing transactions commit out of the order of
their row ids (feed writers take no lock): the feed hands out a row only once no other can
still commit below it, so a reader delivers every row once, in one stable order, and
resuming from any cursor it handed out continues with no gap and no duplicate.

The test holds the transactions open itself to force the commit order. PostgreSQL only:
on SQLite writers are serialized (BEGIN IMMEDIATE), so this interleaving cannot happen.
"""

from __future__ import annotations

import pathlib
import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from payments.v1 import events_pb2
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb
from sqlalchemy.ext.asyncio import AsyncConnection

from payment_grpc.adapters.db.feed import SqlPaymentFeed
from payment_grpc.adapters.db.tables import payment_feed
from payment_grpc.service.ports import FEED_START, FeedFilter, FeedPosition, FeedRead
from tests.conftest import make_settings
from tests.helpers.builders import charge_request, keyed
from tests.helpers.servers import serving
from tests.integration.test_watch_payments import ids, take

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
EVERYTHING = FeedFilter()


async def write_event(conn: AsyncConnection, payment_id: str, sequence: int) -> FeedPosition:
    """A feed row as the event log writes it: `tx` and `position` from the defaults."""
    payload = events_pb2.PaymentEvent(
        event_id=f"{payment_id}:{sequence}",
        type="payment.processing",
        sequence=sequence,
        payment=pb.Payment(payment_id=payment_id, status=pb.PAYMENT_STATUS_PROCESSING),
    ).SerializeToString()
    inserted = await conn.execute(
        payment_feed.insert()
        .values(
            payment_id=payment_id,
            sequence=sequence,
            order_id=f"ord_{payment_id}",
            customer_id="",
            status="PROCESSING",
            payload=payload,
            created_at=datetime.now(UTC),
        )
        .returning(payment_feed.c.tx, payment_feed.c.position)
    )
    tx, position = inserted.one()
    return FeedPosition(tx, position)


async def test_a_lower_id_committed_later_is_delivered_once_in_a_stable_order(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        feed = SqlPaymentFeed(app.engine)
        stream = stub.WatchPayments(api.WatchPaymentsRequest())
        async with app.engine.connect() as late, app.engine.connect() as early:
            lower = await write_event(late, "pay_late", 1)  # its transaction stays open
            higher = await write_event(early, "pay_early", 1)
            await early.commit()
            assert higher.id > lower.id  # the row with the lower id commits later
            # A reader polling now must not hand out pay_early: a reader that did (by id
            # alone) would have its cursor past pay_late's id before pay_late commits.
            assert await feed.after(FEED_START, EVERYTHING, 10) == FeedRead([], held=True)
            # A charge meanwhile commits, and wakes the open stream; it is held back too.
            reply = await stub.Charge(charge_request(), metadata=keyed(uuid.uuid4().hex))
            assert await feed.after(FEED_START, EVERYTHING, 10) == FeedRead([], held=True)
            await late.commit()
        charged = [(reply.payment.payment_id, s) for s in (1, 2, 3)]
        got = await take(stream, 5)
        assert ids(got) == [("pay_late", 1), ("pay_early", 1), *charged]
        # Resumed from every cursor handed out (and from the start), each reader sees the
        # rest in the same order, then the next event: none twice, none missing.
        async with app.engine.begin() as conn:
            await write_event(conn, "pay_next", 1)
        assert ids(await take(stream, 1)) == [("pay_next", 1)]
        stream.cancel()
        every = [*ids(got), ("pay_next", 1)]
        for index, cursor in enumerate(["", *(r.cursor for r in got)]):
            resumed = stub.WatchPayments(api.WatchPaymentsRequest(cursor=cursor))
            assert ids(await take(resumed, len(every) - index)) == every[index:]
            resumed.cancel()


async def test_a_payments_events_stay_in_sequence_order_when_an_older_transaction_writes_later(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """An older transaction (its id taken first, e.g. by an earlier write) that waits for the
    payment and writes its next event after a younger one committed: the feed still lists
    the younger one's event first."""
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        async with app.engine.connect() as older, app.engine.connect() as younger:
            own_id = (await older.execute(sa.text("SELECT pg_current_xact_id()::text"))).scalar()
            first = await write_event(younger, "pay_one", 1)
            await younger.commit()
            second = await write_event(older, "pay_one", 2)
            await older.commit()
        assert int(str(own_id)) < first.tx  # the older transaction's own id is the lower
        assert first < second
        stream = stub.WatchPayments(api.WatchPaymentsRequest(order_id="ord_pay_one"))
        assert ids(await take(stream, 2)) == [("pay_one", 1), ("pay_one", 2)]
        stream.cancel()


async def test_a_transaction_of_ours_left_open_idle_holds_the_feed_back_only_briefly(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """The service's sessions end a transaction idle longer than a statement may run, so a
    stalled one of ours (a blocked task) cannot hold the feed back for longer."""
    settings = make_settings(database_url, tmp_path, db_statement_timeout_seconds=0.5)
    async with serving(settings) as (app, stub):
        stream = stub.WatchPayments(api.WatchPaymentsRequest())
        async with app.engine.connect() as stalled:
            await write_event(stalled, "pay_stalled", 1)  # then nothing: idle in transaction
            reply = await stub.Charge(charge_request(), metadata=keyed(uuid.uuid4().hex))
            got = await take(stream, 3)  # delivered once the server ended the stalled one
            await stalled.invalidate()
        stream.cancel()
    assert ids(got) == [(reply.payment.payment_id, s) for s in (1, 2, 3)]
