"""ChangeFeed's loop: entries the feed holds back (an older transaction still open, which
may end without any commit waking the stream) are read again soon, not at the next poll."""

from __future__ import annotations

import asyncio

from payment_grpc.adapters.bus.memory import InProcessStatusBus
from payment_grpc.service.context import RequestContext
from payment_grpc.service.feed import ChangeFeed, encode_cursor
from payment_grpc.service.ports import FeedEntry, FeedFilter, FeedPosition, FeedRead

ENTRY = FeedEntry(FeedPosition(7, 1), b"event")
NEVER_S = 3600.0  # the periodic poll: not reached in this test


class HeldAtFirst:
    """A feed whose one entry is held back at the first read and final from then on."""

    def __init__(self) -> None:
        self.reads = 0

    async def after(self, position: FeedPosition, where: FeedFilter, limit: int) -> FeedRead:
        self.reads += 1
        if self.reads == 1:
            return FeedRead([], held=True)
        return FeedRead([ENTRY] if position < ENTRY.position else [], held=False)


async def test_entries_held_back_are_read_again_without_a_wake_up() -> None:
    feed = HeldAtFirst()
    stream = ChangeFeed(feed, InProcessStatusBus(), poll_s=NEVER_S).watch(
        "", FeedFilter(), RequestContext()
    )
    item = await asyncio.wait_for(anext(stream), 30)
    await stream.aclose()
    assert item.cursor == encode_cursor(ENTRY.position)
    assert feed.reads == 2
