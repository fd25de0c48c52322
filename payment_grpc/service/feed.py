"""The change feed (WatchPayments): every payment event after a cursor, in commit order.

The cursor is the event's global position (opaque to callers). Positions become visible in
order (adapters/db/event_log.py), so resuming after a cursor misses nothing and repeats
nothing, whatever replica serves the stream and across restarts. The stream subscribes to
the status bus before reading, so no wake-up is lost between a read and the wait, and
reads again at least every POLL_S.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace

from payment_grpc.service.context import RequestContext
from payment_grpc.service.errors import InvalidCursor, PermissionDenied
from payment_grpc.service.ports import (
    ALL_PAYMENTS,
    FeedEntry,
    FeedFilter,
    PaymentFeed,
    StatusBus,
)

CURSOR_PREFIX = "pf1:"
BATCH = 200
# Commits wake the stream through the status bus; the poll is for what the bus cannot
# carry: another process on SQLite, a NOTIFY lost while PostgreSQL's listener reconnects.
POLL_S = 1.0


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"{CURSOR_PREFIX}{position}".encode()).decode()


def decode_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise InvalidCursor() from exc
    number = text.removeprefix(CURSOR_PREFIX)
    if not text.startswith(CURSOR_PREFIX) or not number.isdigit() or len(number) > 19:
        raise InvalidCursor()
    return int(number)


@dataclass(frozen=True, slots=True)
class FeedItem:
    payload: bytes  # a serialized payments.v1.PaymentEvent
    cursor: str  # resume after this item


class ChangeFeed:
    def __init__(
        self, feed: PaymentFeed, bus: StatusBus, batch: int = BATCH, poll_s: float = POLL_S
    ) -> None:
        self._feed = feed
        self._bus = bus
        self._batch = batch
        self._poll_s = poll_s

    async def watch(
        self, cursor: str, where: FeedFilter, ctx: RequestContext
    ) -> AsyncGenerator[FeedItem, None]:
        after = decode_cursor(cursor)
        where = _visible_to(where, ctx)
        async with self._bus.subscribe(ALL_PAYMENTS) as woken:
            while True:
                batch = await self._feed.after(after, where, self._batch)
                for entry in batch:
                    yield _item(entry)
                    after = entry.position
                if len(batch) < self._batch:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._poll_s):
                            await woken.wait()


def _item(entry: FeedEntry) -> FeedItem:
    return FeedItem(entry.payload, encode_cursor(entry.position))


def _visible_to(where: FeedFilter, ctx: RequestContext) -> FeedFilter:
    """A customer token follows only its own payments; naming another is refused."""
    customer = ctx.customer_id
    if customer is None:
        return where
    if not customer or where.customer_id not in ("", customer):
        raise PermissionDenied("payments.read")
    return replace(where, customer_id=customer)
