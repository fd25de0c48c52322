"""Status bus across replicas: PostgreSQL LISTEN/NOTIFY.

A committed change is announced with NOTIFY (payload "payment_id:sequence"); every
replica LISTENs on one connection and wakes its own watchers of that payment, which then
read the events from `payment_events`. A notification lost while the listener reconnects
costs nothing: after reconnecting it wakes every local watcher to re-read the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from sqlalchemy.engine import make_url

from payment_grpc.adapters.bus.memory import InProcessStatusBus
from payment_grpc.service.ports import Subscription

log = logging.getLogger(__name__)
CHANNEL = "payment_status"
RECONNECT_DELAY_S = 1.0


def libpq_dsn(sqlalchemy_url: str) -> str:
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


class PostgresStatusBus:
    def __init__(self, sqlalchemy_url: str) -> None:
        self._dsn = libpq_dsn(sqlalchemy_url)
        self._local = InProcessStatusBus()
        self._publisher: psycopg.AsyncConnection[object] | None = None
        self._publish_lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen_forever())
        await self._listening.wait()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._publisher is not None:
            await self._publisher.close()

    async def publish(self, payment_id: str, sequence: int) -> None:
        self._local.wake(payment_id)
        async with self._publish_lock:
            try:
                if self._publisher is None or self._publisher.closed:
                    self._publisher = await psycopg.AsyncConnection.connect(
                        self._dsn, autocommit=True
                    )
                await self._publisher.execute(
                    "SELECT pg_notify(%s, %s)", (CHANNEL, f"{payment_id}:{sequence}")
                )
            except psycopg.Error as exc:
                # The change is committed; other replicas' watchers catch up on reconnect.
                log.warning("NOTIFY failed for %s: %s", payment_id, exc)
                self._publisher = None

    @asynccontextmanager
    async def subscribe(self, payment_id: str) -> AsyncIterator[Subscription]:
        async with self._local.subscribe(payment_id) as subscription:
            yield subscription

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
