"""One read of a payment's events shared by every watcher that needs the same one.

When the status bus wakes the watchers of a payment, each asks for the events after the
sequence it has delivered; with 100 watchers of one payment that was 100 identical
transactions and SELECTs per change. Here concurrent asks for the same
(payment_id, after_sequence) join one read.

Only a read that has not started yet is joined: a watcher woken by a commit must get a
read that begins after that wake-up, so it sees the commit. A read already running may
have started before the commit, and returning its (possibly empty) result would leave
that watcher waiting for a wake-up already consumed: a stall. So a watcher arriving
late starts a new read, which the ones after it join.
"""

from __future__ import annotations

import asyncio
from contextvars import Context

from payment_grpc.domain.payment import PaymentEvent
from payment_grpc.service.ports import UnitOfWorkFactory

_Key = tuple[str, int, int]  # payment_id, after sequence, limit


class _Read:
    """One pending read: joinable until its task takes its first step."""

    def __init__(self) -> None:
        self.started = False
        self.task: asyncio.Future[list[PaymentEvent]]


class SharedEventReads:
    def __init__(self, uow: UnitOfWorkFactory) -> None:
        self._uow = uow
        self._pending: dict[_Key, _Read] = {}

    async def after(self, payment_id: str, sequence: int, limit: int) -> list[PaymentEvent]:
        """The events of `payment_id` after `sequence` (at most `limit`), read in a
        transaction that begins after this call."""
        key = (payment_id, sequence, limit)
        read = self._pending.get(key)
        if read is None or read.started:
            read = self._pending[key] = _Read()
            # Its own context: the read serves many calls, so no one call's deadline or
            # trace is its own.
            coro = self._run(read, key)
            read.task = asyncio.get_running_loop().create_task(coro, context=Context())
            read.task.add_done_callback(_retrieve)
        # The read is everyone's: a watcher that goes away must not cancel it for the rest.
        return await asyncio.shield(read.task)

    async def _run(self, read: _Read, key: _Key) -> list[PaymentEvent]:
        read.started = True
        try:
            async with self._uow(read_only=True) as tx:
                return await tx.payments.events_after(*key)
        finally:
            if self._pending.get(key) is read:
                del self._pending[key]


def _retrieve(task: asyncio.Future[list[PaymentEvent]]) -> None:
    """Mark a failure as seen: the watchers that were waiting for it may all be gone
    (each got it through its own shield), and asyncio would log it as never retrieved."""
    if not task.cancelled():
        task.exception()
