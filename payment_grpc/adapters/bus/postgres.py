"""Status bus across replicas: PostgreSQL LISTEN/NOTIFY.

A committed change is announced with NOTIFY (payload "payment_id:sequence"); every
replica LISTENs on one connection and wakes its own watchers of that payment, which then
read the events from `payment_events`. A notification lost while the listener reconnects
costs nothing: after reconnecting it wakes every local watcher to re-read the table.

Publishing never waits for PostgreSQL: local watchers are woken at once, and the NOTIFYs
queue up for one sender task, which sends whatever has queued meanwhile in one statement
(a busy server sends many per round trip instead of one round trip per event, in turn).
What queues is one notification per payment, its latest sequence: a notification only wakes
watchers, who read every event after the last one they sent from the table, and the latest
is sent after every earlier change of that payment was committed (under load a Charge's two
changes, PROCESSING and CAPTURED, often queue behind one send: one NOTIFY instead of two).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager

import psycopg
from sqlalchemy.engine import make_url

from payment_grpc.adapters.bus.memory import InProcessStatusBus
from payment_grpc.service.ports import Subscription
from payment_grpc.tasks import stop_task

log = logging.getLogger(__name__)
CHANNEL = "payment_status"
RECONNECT_DELAY_S = 1.0
CLOSE_SEND_TIMEOUT_S = 5.0
_NOTIFY_ALL = "SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS payload"


def libpq_dsn(sqlalchemy_url: str) -> str:
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


class PostgresStatusBus:
    def __init__(self, sqlalchemy_url: str) -> None:
        self._dsn = libpq_dsn(sqlalchemy_url)
        self._local = InProcessStatusBus()
        self._publisher: psycopg.AsyncConnection[object] | None = None
        self._queued: dict[str, int] = {}  # payment id -> latest sequence, for the sender
        self._sender: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen_forever())
        await self._listening.wait()

    async def close(self) -> None:
        if self._sender is not None:  # what was published before close still goes out
            _done, late = await asyncio.wait([self._sender], timeout=CLOSE_SEND_TIMEOUT_S)
            for task in late:  # PostgreSQL is gone: the other replicas poll
                task.cancel()
        await stop_task(self._listener)
        if self._publisher is not None:
            await self._publisher.close()

    async def publish(self, payment_id: str, sequence: int) -> None:
        self._local.wake(payment_id)
        if sequence > self._queued.get(payment_id, 0):
            self._queued[payment_id] = sequence
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_queued())

    async def _send_queued(self) -> None:
        while self._queued:
            queued, self._queued = self._queued, {}
            payloads = [f"{payment_id}:{sequence}" for payment_id, sequence in queued.items()]
            try:
                if self._publisher is None or self._publisher.closed:
                    self._publisher = await psycopg.AsyncConnection.connect(
                        self._dsn, autocommit=True
                    )
                await self._publisher.execute(_NOTIFY_ALL, (CHANNEL, payloads))
            except psycopg.Error as exc:
                # The changes are committed; other replicas' watchers catch up on reconnect.
                log.warning("NOTIFY failed for %d changes: %s", len(payloads), exc)
                self._publisher = None

    def subscribe(self, payment_id: str) -> AbstractAsyncContextManager[Subscription]:
        return self._local.subscribe(payment_id)

    def watcher_count(self) -> int:
        return self._local.watcher_count()

    async def wait_until_idle(self) -> bool:
        return await self._local.wait_until_idle()

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
            await asyncio.sleep(RECONNECT_DELAY_S)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._listening.set()
            self._local.wake_all()  # anything missed while disconnected is re-read
            async for notice in conn.notifies():
                self._local.wake(notice.payload.split(":", 1)[0])
