"""Migration 0011_feed_without_counter on SQLite and PostgreSQL: feed rows written before it
keep their position with tx 0, so a cursor the old server handed out resumes exactly where
it was; rows written after come after them and never reuse a position the counter gave
out; downgrade brings the counter back at the highest position."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command

from payment_grpc.adapters.db.engine import make_engine
from payment_grpc.adapters.db.feed import SqlPaymentFeed
from payment_grpc.adapters.db.migrate import alembic_config
from payment_grpc.service.feed import decode_cursor
from payment_grpc.service.ports import FeedFilter, FeedPosition
from tests.integration.test_feed_horizon import write_event
from tests.integration.test_key_operation_migration import _sync_engine, fresh_url

REVISION = "0011_feed_without_counter"
OLD_CURSOR = "cGYxOjM="  # what the old server sent with the event at position 3
__all__ = ["fresh_url"]  # the fixture


def _plant(url: str) -> None:
    """Five events at positions 1-5; the counter at 7 (6 and 7 were handed out, their rows
    are gone)."""
    engine = _sync_engine(url)
    try:
        with engine.begin() as conn:
            for position in range(1, 6):
                conn.execute(
                    sa.text(
                        "INSERT INTO payment_feed (position, payment_id, sequence, order_id,"
                        " customer_id, status, payload, created_at) VALUES (:position, 'pay_old',"
                        " :position, 'ord_old', '', 'PROCESSING', :payload, :now)"
                    ),
                    {
                        "position": position,
                        "payload": b"old-%d" % position,
                        "now": datetime.now(UTC),
                    },
                )
            conn.execute(sa.text("UPDATE feed_counter SET last_position = 7"))
    finally:
        engine.dispose()


def _after_downgrade(url: str) -> tuple[int, set[str]]:
    engine = _sync_engine(url)
    try:
        with engine.connect() as conn:
            counter = conn.execute(sa.text("SELECT last_position FROM feed_counter")).scalar_one()
            columns = {c["name"] for c in sa.inspect(conn).get_columns("payment_feed")}
    finally:
        engine.dispose()
    return counter, columns


async def test_a_cursor_from_before_the_upgrade_resumes_exactly(fresh_url: str) -> None:
    config = alembic_config(fresh_url)
    await asyncio.to_thread(command.upgrade, config, f"{REVISION}-1")
    _plant(fresh_url)
    await asyncio.to_thread(command.upgrade, config, REVISION)
    engine = make_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            written = await write_event(conn, "pay_new", 1)
        # Only the old rows, so that no transaction elsewhere in the cluster can hold the
        # new one back (the horizon is tested in test_feed_horizon.py).
        resumed = await SqlPaymentFeed(engine).after(decode_cursor(OLD_CURSOR), FeedFilter(), 2)
    finally:
        await engine.dispose()
    assert [(entry.position, entry.payload) for entry in resumed.entries] == [
        (FeedPosition(0, 4), b"old-4"),
        (FeedPosition(0, 5), b"old-5"),
    ]
    assert written.id == 8  # above the counter, not only above the rows
    assert written > FeedPosition(0, 5)
    await asyncio.to_thread(command.downgrade, config, f"{REVISION}-1")
    counter, columns = _after_downgrade(fresh_url)
    assert counter == 8
    assert "tx" not in columns
