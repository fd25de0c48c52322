"""In-process status bus: wakes watchers of a payment after a commit.

A notification is only a wake-up; watchers read the events from the table. Each
subscriber owns one asyncio.Event, so publishing is O(watchers of that payment), never
waits, and a slow watcher only coalesces wake-ups instead of buffering them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from payment_grpc.service.ports import ALL_PAYMENTS


class _Subscription:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()


class InProcessStatusBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[_Subscription]] = defaultdict(set)
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Nothing to start: watchers live in this process."""

    async def close(self) -> None:
        """Nothing to close."""

    async def publish(self, payment_id: str, sequence: int) -> None:
        self.wake(payment_id)

    def wake(self, payment_id: str) -> None:
        for key in (payment_id, ALL_PAYMENTS):  # the change feed hears every payment
            for subscription in self._subscribers.get(key, ()):
                subscription.notify()

    def wake_all(self) -> None:
        for watchers in self._subscribers.values():
            for subscription in watchers:
                subscription.notify()

    @asynccontextmanager
    async def subscribe(self, payment_id: str) -> AsyncIterator[_Subscription]:
        subscription = _Subscription()
        self._subscribers[payment_id].add(subscription)
        self._idle.clear()
        try:
            yield subscription
        finally:
            watchers = self._subscribers[payment_id]
            watchers.discard(subscription)
            if not watchers:
                del self._subscribers[payment_id]
            if not self._subscribers:
                self._idle.set()

    def watcher_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    async def wait_until_idle(self) -> bool:
        """Return once no watcher is subscribed (for tests and shutdown)."""
        await self._idle.wait()
        return True
