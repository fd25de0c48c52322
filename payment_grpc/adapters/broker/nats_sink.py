"""Payment events on NATS JetStream: the broker sink of the outbox relay (EventSink).

Subject `<prefix>.<type>` (default prefix `payments.v1`, e.g. `payments.v1.payment.captured`)
in the stream (default `PAYMENTS`, created when missing, subjects `<prefix>.>`). The
`Nats-Msg-Id` header is the event's dedupe id, so JetStream drops a relay's redelivery
within its duplicate window; consumers dedupe beyond it by the envelope's `event_id`.
The W3C `traceparent` header continues the trace of the call that made the change (captured
in the envelope when the event was recorded): a PRODUCER span of ours when traces are
exported, the recorded context itself otherwise.

nats-py's exceptions are mapped here, once, to SinkUnavailable. A Kafka adapter would be a
file like this one: the same four methods, the dedupe id as the record key (idempotent
producer), the type as the topic suffix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from payments.v1 import events_pb2

from payment_grpc.service.ports import OutboxMessage, SinkUnavailable
from payment_grpc.telemetry.tracing import continued, messaging_span

log = logging.getLogger(__name__)
PUBLISH_TIMEOUT_S = 5.0
RECONNECT_ATTEMPTS = 3


async def _connection_error(error: Exception) -> None:
    """nats-py logs a traceback per failed attempt by default; the relay already logs
    each failed delivery (SinkUnavailable) in one line, so these are DEBUG."""
    log.debug("NATS connection error: %s", type(error).__name__)


class NatsEventSink:
    name = "broker"

    def __init__(self, url: str, *, stream: str = "PAYMENTS", prefix: str = "payments.v1") -> None:
        self._url = url
        self._stream = stream
        self._prefix = prefix
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting = asyncio.Lock()

    def wants(self, event_type: str) -> bool:
        return True  # every event is published

    def subject(self, event_type: str) -> str:
        return f"{self._prefix}.{event_type}"

    async def start(self) -> None:
        """Connect now if the broker is there; if not, the first delivery tries again."""
        with contextlib.suppress(SinkUnavailable):
            await self._jetstream()

    async def deliver(self, message: OutboxMessage) -> None:
        js = await self._jetstream()
        subject = self.subject(message.event_type)
        traceparent = events_pb2.PaymentEvent.FromString(message.payload).trace.traceparent
        try:
            with continued(traceparent), messaging_span(subject, "publish") as trace_headers:
                await js.publish(
                    subject,
                    message.payload,
                    timeout=PUBLISH_TIMEOUT_S,
                    stream=self._stream,
                    headers={**trace_headers, "Nats-Msg-Id": message.dedupe_id},
                )
        except (NatsError, TimeoutError, OSError) as exc:
            raise SinkUnavailable(f"NATS publish failed: {type(exc).__name__}") from exc

    async def _jetstream(self) -> JetStreamContext:
        async with self._connecting:
            if self._client is not None and self._client.is_closed:
                self._client = self._js = None  # gave up reconnecting: start over
            if self._js is not None:
                return self._js
            try:
                # A bounded number of reconnects: when they are spent the client closes and
                # the next delivery connects anew (an unbounded count would make this first
                # connect wait forever for a broker that is down).
                client = await nats.connect(
                    self._url,
                    connect_timeout=2,
                    max_reconnect_attempts=RECONNECT_ATTEMPTS,
                    reconnect_time_wait=0.5,
                    error_cb=_connection_error,
                )
                js = client.jetstream()
                await js.add_stream(name=self._stream, subjects=[f"{self._prefix}.>"])
            except (NatsError, TimeoutError, OSError) as exc:
                raise SinkUnavailable(f"NATS unreachable: {type(exc).__name__}") from exc
            self._client, self._js = client, js
            return js

    async def close(self) -> None:
        client, self._client, self._js = self._client, None, None
        if client is not None and not client.is_closed:
            try:
                await client.drain()
            except (NatsError, TimeoutError, OSError):
                await client.close()
