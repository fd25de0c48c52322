"""The change feed (WatchPayments): every payment event after a cursor, in feed order.

The cursor is the event's feed position (tx, id), opaque to callers. The feed hands out an
entry only once nothing can still commit below it (adapters/db/feed.py), so resuming after
a cursor misses nothing and repeats nothing, whatever replica serves the stream and across
restarts. The stream subscribes to the status bus before reading, so no wake-up is lost
between a read and the wait, and reads again at least every POLL_S.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace

from payment_grpc.service.context import RequestContext
from payment_grpc.service.errors import InvalidCursor, PermissionDenied
from payment_grpc.service.ports import (
    ALL_PAYMENTS,
    FEED_START,
    FeedEntry,
    FeedFilter,
    FeedPosition,
    PaymentFeed,
    StatusBus,
)

# pf2:<tx>.<id>. A pf1:<position> cursor was issued before revision 0011, which kept every
# position as the row's id with tx 0: it resumes at (0, position), exactly where it was.
CURSOR_PREFIX = "pf2:"
OLD_CURSOR_PREFIX = "pf1:"
_BIGINT_MAX = 2**63 - 1
BATCH = 200
# Commits wake the stream through the status bus; the poll is for what the bus cannot
# carry: another process on SQLite, a NOTIFY lost while PostgreSQL's listener reconnects.
POLL_S = 1.0
HELD_FIRST_S = 0.01  # entries held back (adapters/db/feed.py): first look again after this


def encode_cursor(position: FeedPosition) -> str:
    text = f"{CURSOR_PREFIX}{position.tx}.{position.id}"
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_cursor(cursor: str) -> FeedPosition:
    if not cursor:
        return FEED_START
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise InvalidCursor() from exc
    if text.startswith(OLD_CURSOR_PREFIX):
        return FeedPosition(0, _number(text.removeprefix(OLD_CURSOR_PREFIX)))
    if not text.startswith(CURSOR_PREFIX):
        raise InvalidCursor()
    tx, dot, id_ = text.removeprefix(CURSOR_PREFIX).partition(".")
    if not dot:
        raise InvalidCursor()
    return FeedPosition(_number(tx), _number(id_))


def _number(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > len(str(_BIGINT_MAX)):
        raise InvalidCursor()
    number = int(text)
    if number > _BIGINT_MAX:
        raise InvalidCursor()
    return number


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
        held_wait = HELD_FIRST_S
        async with self._bus.subscribe(ALL_PAYMENTS) as woken:
            while True:
                read = await self._feed.after(after, where, self._batch)
                for entry in read.entries:
                    yield _item(entry)
                    after = entry.position
                if len(read.entries) == self._batch:
                    continue
                # Held back entries wait for an older transaction, which may end without
                # any commit waking us (it wrote no event): look again soon, less often
                # the longer it lasts.
                wait = held_wait if read.held else self._poll_s
                held_wait = min(held_wait * 2, self._poll_s) if read.held else HELD_FIRST_S
                await woken.wait(wait)


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
