"""The checkout saga's inbound side on NATS JetStream (SAGA_CONSUME=true): a durable pull
consumer on `inventory.v1.reserved`, shared by every replica (each message goes to one).

For each message the handler (api/saga.py) answers a verdict, and only then is the message
settled: DONE -> ack (the outcome was committed before), RETRY -> nak with a delay (JetStream
delivers it again, to any replica), REJECTED -> term (never again). A crash before the ack
means a redelivery after `ack_wait`, which the idempotency key turns into a replay. The
stream is the inventory service's; it is created when missing (a development setup).

nats-py's exceptions are handled here: a lost broker is reconnected by the client; a pass
that fails is logged and the next one starts after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from payment_grpc.service.saga import Verdict
from payment_grpc.tasks import stop_task

log = logging.getLogger(__name__)

Handler = Callable[[bytes, Mapping[str, str]], Awaitable[Verdict]]
FETCH_WAIT_S = 5.0
PAUSE_AFTER_ERROR_S = 1.0
CLOSE_FLUSH_S = 2.0


@dataclass(frozen=True, slots=True)
class SagaConsumerConfig:
    url: str
    stream: str = "INVENTORY"
    subject: str = "inventory.v1.reserved"
    durable: str = "payment-grpc-saga"
    batch: int = 10  # messages handled at once by one replica
    ack_wait_s: float = 60.0  # unacknowledged this long (a crash): delivered again
    retry_delay_s: float = 2.0  # a RETRY verdict's redelivery delay


class SagaConsumer:
    def __init__(self, config: SagaConsumerConfig, handle: Handler) -> None:
        self._config = config
        self._handle = handle
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.settled: dict[Verdict, int] = dict.fromkeys(Verdict, 0)  # metrics, tests
        self._progress = asyncio.Condition()
        self.subscribed = asyncio.Event()
        self._last_error = ""

    async def start(self) -> None:
        """Consume in the background: connecting waits for the broker without holding up
        the service (a WARNING per failed attempt), `subscribed` is set once it consumes."""
        self._task = asyncio.create_task(self._run())

    async def _subscribe(self) -> object:
        config = self._config
        client = await nats.connect(
            config.url,
            connect_timeout=2,
            max_reconnect_attempts=-1,  # for ever: the consumer waits for the broker
            reconnect_time_wait=2,
            error_cb=self._broker_error,
        )
        self._client = client
        js = client.jetstream()
        try:
            await js.stream_info(config.stream)
        except NotFoundError:
            await js.add_stream(name=config.stream, subjects=[config.subject])
        return await js.pull_subscribe(
            config.subject,
            durable=config.durable,
            stream=config.stream,
            config=ConsumerConfig(ack_wait=config.ack_wait_s, max_ack_pending=1000),
        )

    async def _broker_error(self, error: Exception) -> None:
        """One WARNING line when the broker's failure changes (nats-py would log a
        traceback for every reconnect attempt)."""
        kind = type(error).__name__
        if kind != self._last_error:
            self._last_error = kind
            log.warning("saga consumer: NATS error, reconnecting: %s", kind)

    async def wait_until(self, condition: Callable[[dict[Verdict, int]], bool]) -> None:
        """Return once `condition(settled counts)` holds (tests await this)."""
        async with self._progress:
            await self._progress.wait_for(lambda: condition(self.settled))

    async def _run(self) -> None:
        while True:
            try:
                subscription = await self._subscribe()
                break
            except (NatsError, TimeoutError, OSError) as exc:
                log.warning("saga consumer: NATS not reachable yet: %s", type(exc).__name__)
                await self._drop_client()
                await asyncio.sleep(PAUSE_AFTER_ERROR_S)
        self.subscribed.set()
        fetch = subscription.fetch  # type: ignore[attr-defined]
        while True:
            try:
                messages: list[Msg] = await fetch(self._config.batch, timeout=FETCH_WAIT_S)
            except NatsTimeout:
                continue  # nothing to do
            except (NatsError, OSError) as exc:
                log.warning("saga consumer: fetch failed: %s", type(exc).__name__)
                await asyncio.sleep(PAUSE_AFTER_ERROR_S)
                continue
            await asyncio.gather(*(self._settle(message) for message in messages))

    async def _settle(self, message: Msg) -> None:
        try:
            verdict = await self._handle(message.data, message.headers or {})
        except Exception:
            log.exception("saga consumer: handling a message failed; delivered again later")
            verdict = Verdict.RETRY
        try:
            if verdict is Verdict.DONE:
                await message.ack()
            elif verdict is Verdict.RETRY:
                await message.nak(delay=self._config.retry_delay_s)
            else:
                await message.term()
        except (NatsError, OSError) as exc:  # unsettled: JetStream redelivers after ack_wait
            log.warning("saga consumer: could not settle a message: %s", type(exc).__name__)
            return
        async with self._progress:
            self.settled[verdict] += 1
            self._progress.notify_all()

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        await self._drop_client()

    async def _drop_client(self) -> None:
        """Flush what was written (acks, naks), then close. Not `drain`: it waits for the
        pull subscription's open fetch, up to 30 s when the stream or consumer is gone."""
        client, self._client = self._client, None
        if client is None or client.is_closed:
            return
        with contextlib.suppress(NatsError, TimeoutError, OSError):
            async with asyncio.timeout(CLOSE_FLUSH_S):
                await client.flush()
        await client.close()
