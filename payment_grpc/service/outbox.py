"""The outbox relay: delivers the payment events the transactions wrote to the outbox, to
every sink (order service notifications, the broker), in every replica.

- Claims due rows (at most the earliest undelivered event per payment and sink, so a later
  sequence never overtakes an earlier one) under a lease, delivers them outside any
  transaction, marks them delivered. Each delivery runs on its own (at most `batch_size`
  at once): a slow or hanging sink holds back only its own message and the later events
  of that payment, never the other payments or sinks; it is given up when its lease ends
  (the moment another replica may take the row over). A crash leaves them claimed until
  the lease ends; another replica (or this one restarted) delivers them again: at least
  once, with a stable dedupe id (`<payment_id>:<sequence>`) the receivers drop repeats by.
- A failed delivery is due again after exponential backoff with jitter; after
  `max_attempts` it is parked with its last error (`payment-grpc outbox list|retry`).
  A parked event holds back the later events of its payment for that sink.
- Woken right after each commit that wrote outbox rows; a slow poll is the safety net
  (other replicas' commits, expired leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from payment_grpc.domain.payment import Payment, PaymentEvent, PaymentStatus
from payment_grpc.service.ports import (
    Clock,
    EventSink,
    OutboxMessage,
    OutboxStore,
    SinkUnavailable,
)

log = logging.getLogger(__name__)

# What the order service hears about: every outcome, none of the steps before one.
OUTCOME_TYPES = frozenset(
    f"payment.{status.value.lower()}"
    for status in (
        PaymentStatus.AUTHORIZED,
        PaymentStatus.CAPTURED,
        PaymentStatus.FAILED,
        PaymentStatus.CANCELED,
        PaymentStatus.PARTIALLY_REFUNDED,
        PaymentStatus.REFUNDED,
    )
)
MAX_ERROR_CHARS = 500
MIN_IDLE_S = 0.01  # never a hot loop, whatever the clocks of the replicas say


def event_type(event: PaymentEvent) -> str:
    """`payment.created` for the first event, else `payment.<new status>`."""
    if event.previous_status is None:
        return "payment.created"
    return f"payment.{event.status.value.lower()}"


def dedupe_id(payment_id: str, sequence: int) -> str:
    return f"{payment_id}:{sequence}"


# The checkout saga's outcome events (service/saga.py): a payment the saga made (its
# metadata names the inventory event) says `payment.completed` when it first succeeds, beside
# the event of its own type; a failure is the ordinary `payment.failed`.
SAGA_EVENT_KEY = "inventory_event_id"
COMPLETED = "payment.completed"
_SUCCEEDED = frozenset({PaymentStatus.AUTHORIZED, PaymentStatus.CAPTURED})


def event_types(payment: Payment, event: PaymentEvent) -> tuple[str, ...]:
    """What an event is published as: its own type, then `payment.completed` when it is the
    success of a saga payment (leaving PROCESSING for AUTHORIZED or CAPTURED, whoever
    recorded it: the charge, the recovery worker, a settlement, an operator)."""
    own = event_type(event)
    if (
        SAGA_EVENT_KEY in payment.metadata
        and event.previous_status is PaymentStatus.PROCESSING
        and event.status in _SUCCEEDED
    ):
        return own, COMPLETED
    return (own,)


def event_id(event: PaymentEvent, kind: str) -> str:
    """The dedupe id of an event published as `kind`: `<payment_id>:<sequence>`, and for
    the saga's `payment.completed`, which shares its event's sequence, `...:completed`."""
    own = dedupe_id(event.payment_id, event.sequence)
    return own if kind == event_type(event) else f"{own}:{kind.removeprefix('payment.')}"


# A charge refused outright for an inventory event (no payment: service/saga.py) is
# published as `payment.failed` too, with the refusal in the envelope. Sinks are asked
# whether they want it as REFUSAL_ROUTE: the order service's notification, which is about a
# payment, does not; the broker does.
FAILED = "payment.failed"
REFUSAL_ROUTE = "charge.refused"
_MAX_REFUSAL_ID = 64  # fits the outbox's payment_id and dedupe_id columns


def refusal_event_id(inventory_event_id: str) -> str:
    """The dedupe id of the refusal of an inventory event: `inventory:<event_id>:failed`,
    with the event id's SHA-256 in its place when that would be too long."""
    full = f"inventory:{inventory_event_id}:failed"
    if len(full) <= _MAX_REFUSAL_ID:
        return full
    digest = hashlib.sha256(inventory_event_id.encode()).hexdigest()[:40]
    return f"inventory:{digest}:failed"


# (sink, seconds since its oldest undelivered message was written, parked messages)
BacklogObserver = Callable[[str, float, int], None]


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    batch_size: int = 100
    lease: timedelta = timedelta(seconds=30)  # a claim older than this is taken over
    poll: timedelta = timedelta(seconds=5)  # safety net when no commit wakes the relay
    backoff_initial: timedelta = timedelta(seconds=1)
    backoff_max: timedelta = timedelta(minutes=5)
    max_attempts: int = 12  # then parked
    backlog_every: timedelta = timedelta(seconds=5)  # how often the backlog is observed


@dataclass
class RelayStats:
    """What this replica's relay did since it started (metrics, and what tests await)."""

    delivered: int = 0
    failed: int = 0
    parked: int = 0


class Relay:
    def __init__(
        self,
        store: OutboxStore,
        sinks: Sequence[EventSink],
        clock: Clock,
        policy: RelayPolicy,
        owner: str,
        observe: BacklogObserver | None = None,
    ) -> None:
        """`observe(sink, lag_seconds, parked)`: told every `backlog_every` while the relay
        runs, for each sink: the age of its oldest undelivered message (0: none) and its
        parked messages (metrics)."""
        self._store = store
        self._observe = observe
        self._observed_at: datetime | None = None
        self._sinks: Mapping[str, EventSink] = {sink.name: sink for sink in sinks}
        self._clock = clock
        self._policy = policy
        self._owner = owner
        self._wakeup = asyncio.Event()
        self.stats = RelayStats()
        self._progress = asyncio.Condition()
        self._in_flight: dict[int, asyncio.Task[None]] = {}  # row id -> its delivery

    async def wait_until(self, condition: Callable[[RelayStats], bool]) -> None:
        """Return once `condition(stats)` holds (checked after every recorded outcome)."""
        async with self._progress:
            await self._progress.wait_for(lambda: condition(self.stats))

    async def _count(self, field: str) -> None:
        async with self._progress:
            setattr(self.stats, field, getattr(self.stats, field) + 1)
            self._progress.notify_all()

    def wake(self) -> None:
        """Something was committed to the outbox: look now, not at the next poll."""
        self._wakeup.set()

    async def run_forever(self) -> None:
        try:
            while True:
                self._wakeup.clear()  # before the pass: a commit during it wakes the next one
                try:
                    claimed = await self.deliver_due()
                except Exception:
                    log.exception("outbox relay pass failed")
                    claimed = 0
                if claimed == 0:
                    await self._idle()
        finally:  # stopped: deliveries under way end; their rows wait for the lease
            deliveries = list(self._in_flight.values())
            for delivery in deliveries:
                delivery.cancel()
            await asyncio.gather(*deliveries, return_exceptions=True)

    async def deliver_due(self) -> int:
        """One pass: claim due messages (as many as there are free delivery slots) and
        start delivering each; returns how many were claimed. A finished delivery wakes
        the relay: a slot is free, and the payment's next event may be due."""
        free = self._policy.batch_size - len(self._in_flight)
        if free <= 0:
            return 0
        now = self._clock.now()
        batch = await self._store.claim(
            self._owner, now, now + self._policy.lease, free, exclude=tuple(self._in_flight)
        )
        for message in batch:
            delivery = asyncio.create_task(self._deliver(message))
            self._in_flight[message.row_id] = delivery
            delivery.add_done_callback(functools.partial(self._finished, message.row_id))
        return len(batch)

    def _finished(self, row_id: int, _delivery: asyncio.Task[None]) -> None:
        self._in_flight.pop(row_id, None)
        self.wake()

    async def _observe_backlog(self) -> None:
        now = self._clock.now()
        if self._observe is None or (
            self._observed_at is not None and now - self._observed_at < self._policy.backlog_every
        ):
            return
        self._observed_at = now
        backlog = await self._store.backlog()
        for sink in self._sinks:
            oldest, parked = backlog.get(sink, (None, 0))
            lag = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
            self._observe(sink, lag, parked)

    async def _idle(self) -> None:
        try:
            await self._observe_backlog()
        except Exception:
            log.exception("outbox backlog not observed")
        timeout = self._policy.poll.total_seconds()
        if self._observe is not None:
            timeout = min(timeout, self._policy.backlog_every.total_seconds())
        due = await self._store.next_due()
        if due is not None:
            until_due = (due - self._clock.now()).total_seconds()
            timeout = min(timeout, max(MIN_IDLE_S, until_due))
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
        # that arrives as the wake-up does (a delivery finishing or a commit at shutdown),
        # and the stopping relay would then run on forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()

    async def _deliver(self, message: OutboxMessage) -> None:
        sink = self._sinks.get(message.sink)
        try:
            if sink is None:
                raise SinkUnavailable(f"sink {message.sink} is not configured here")
            try:
                async with asyncio.timeout(self._policy.lease.total_seconds()):
                    await sink.deliver(message)
            except TimeoutError as exc:
                raise SinkUnavailable("no answer before the claim's lease ended") from exc
        except Exception as exc:  # any failure of one message is that message's
            await self._failed(message, exc)
            return
        await self._store.delivered(message, self._clock.now())
        await self._count("delivered")

    async def _failed(self, message: OutboxMessage, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        attempts = message.attempts + 1
        retry_at = None if attempts >= self._policy.max_attempts else self._retry_at(attempts)
        level = logging.WARNING if isinstance(exc, SinkUnavailable) else logging.ERROR
        log.log(
            level,
            "outbox delivery failed",
            extra={"sink": message.sink, "dedupe_id": message.dedupe_id, "error": error,
                   "attempts": attempts, "parked": retry_at is None},
        )  # fmt: skip
        await self._store.failed(message, self._owner, error, retry_at)
        await self._count("failed" if retry_at is not None else "parked")

    def _retry_at(self, attempts: int) -> datetime:
        """Exponential backoff with full jitter in its upper half, capped."""
        base = self._policy.backoff_initial * (1 << min(attempts - 1, 30))
        delay = min(base, self._policy.backoff_max) * random.uniform(0.5, 1.0)
        return self._clock.now() + delay

    async def start_sinks(self) -> None:
        for sink in self._sinks.values():
            await sink.start()

    async def close_sinks(self) -> None:
        for sink in self._sinks.values():
            await sink.close()
