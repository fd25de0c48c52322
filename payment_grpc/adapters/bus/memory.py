"""In-process status bus: wakes watchers of a payment after a commit.

A notification is only a wake-up; watchers read the events from the table. Each
subscriber owns one flag and, while it waits, one future, so publishing is O(watchers
of that payment), never waits, and a slow watcher only coalesces wake-ups instead of
buffering them.

A subscription is its own context manager and waits on a bare future (with a timer when
it waits with a timeout): with 10,000 watchers open, each generator-based context
manager, asyncio.Event and task per watcher was more for the garbage collector to walk.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import TracebackType

from payment_grpc.service.ports import ALL_PAYMENTS


class _Subscription:
    __slots__ = ("_bus", "_payment_id", "_waiter", "_woken")

    def __init__(self, bus: InProcessStatusBus, payment_id: str) -> None:
        self._bus = bus
        self._payment_id = payment_id
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None

    async def __aenter__(self) -> _Subscription:
        self._bus._add(self._payment_id, self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._bus._remove(self._payment_id, self)

    def notify(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float | None = None) -> bool:
        if not self._woken:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if timeout_s is None else loop.call_later(timeout_s, _quiet, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        woken, self._woken = self._woken, False
        return woken


def _quiet(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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

    def subscribe(self, payment_id: str) -> _Subscription:
        return _Subscription(self, payment_id)

    def _add(self, payment_id: str, subscription: _Subscription) -> None:
        self._subscribers[payment_id].add(subscription)
        self._idle.clear()

    def _remove(self, payment_id: str, subscription: _Subscription) -> None:
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
