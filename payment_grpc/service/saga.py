"""The payment step of an event-driven checkout (saga participation).

The inventory service announces `inventory.v1.reserved` (the items of an order are held);
this use case charges for it exactly once per event, whatever the broker redelivers:

- The idempotency key is derived from the event id (`inventory:<event_id>`, scope
  `system:saga`, operation CHARGE), fingerprinted by the event's content. A redelivery
  finds the key finished (nothing runs again), still running (retry later), or left
  half-way by a crash (it resumes, as a retried Charge call does).
- The outcome reaches the checkout through the outbox, in the transaction that records it:
  a payment made here carries the event id in its metadata, so its success is published as
  `payment.completed` beside its own event, and a decline as the ordinary
  `payment.failed` (service/outbox.py, `event_types`).
- A definite refusal that leaves no payment (order unknown, not payable, mismatching, an
  active payment already, the event's content invalid) is published as `payment.failed`
  without a payment (the refusal's reason, the order and event ids), through the outbox,
  in the transaction that stores it as the key's answer: a redelivery replays the key and
  writes nothing again (dedupe id `inventory:<event_id>:failed`).
- The broker message is acknowledged only once the outcome is committed (`Verdict.DONE`);
  a retryable failure, or an outcome still pending at the gateway, asks for a redelivery
  (`Verdict.RETRY`); a message that can never be charged is dropped (`Verdict.REJECTED`),
  once its refusal is committed when it has an event id to answer for.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from payment_grpc.domain.errors import ReportableError
from payment_grpc.domain.payment import Payment, PaymentStatus
from payment_grpc.service.charging import ChargeCommand, Charging
from payment_grpc.service.context import RequestContext
from payment_grpc.service.errors import IdempotencyKeyInUse, IdempotencyKeyReused, InvalidEvent
from payment_grpc.service.idempotency import Checkpoint, IdempotencyKeys
from payment_grpc.service.outbox import refusal_event_id
from payment_grpc.service.ports import ChargeRefusal, Clock, KeyRecord, Operation, StoredAnswer

log = logging.getLogger(__name__)

SAGA_SUBJECT = "system:saga"
KEY_PREFIX = "inventory:"


class Verdict(enum.Enum):
    DONE = "done"  # the outcome is committed (or was already): acknowledge
    RETRY = "retry"  # nothing final yet: deliver the message again later
    REJECTED = "rejected"  # can never be charged as it is: drop it


class Refusals(enum.Enum):
    """How a refusal of the charge is treated, as the transport's error table says."""

    STORED = "stored"  # a definite answer (order not payable, ...): the key's answer
    RETRYABLE = "retryable"  # storage or a collaborator down: try again later
    INVALID = "invalid"  # the request itself is wrong: never chargeable


@dataclass(frozen=True, slots=True)
class Reservation:
    """An `inventory.v1.reserved` event, converted: what to charge for it."""

    event_id: str
    order_id: str
    command: ChargeCommand | None  # its metadata names the event (SAGA_EVENT_KEY)
    fingerprint: str  # of the event's content: the same id with other content is refused
    invalid: str = ""  # why the event breaks the Charge request's rules (then no command)


class CheckoutSaga:
    def __init__(
        self,
        charging: Charging,
        keys: IdempotencyKeys,
        encode: Callable[[Payment], bytes],
        encode_refusal: Callable[[ReportableError], StoredAnswer],
        classify: Callable[[ReportableError], Refusals],
        clock: Clock,
    ) -> None:
        """`encode`/`encode_refusal`: the key's answers, the same bytes a Charge call with
        that key would store; `classify`: the transport's view of a refusal."""
        self._charging = charging
        self._keys = keys
        self._encode = encode
        self._encode_refusal = encode_refusal
        self._classify = classify
        self._clock = clock

    async def on_reserved(self, reservation: Reservation, ctx: RequestContext) -> Verdict:
        key = KEY_PREFIX + reservation.event_id
        try:
            claimed = await self._keys.begin(
                ctx.subject, Operation.CHARGE, key, reservation.fingerprint
            )
        except IdempotencyKeyInUse:
            return Verdict.RETRY  # another delivery is charging it right now
        except IdempotencyKeyReused:
            log.error("inventory event %s seen before with other content", reservation.event_id)
            return Verdict.REJECTED
        except ReportableError as error:  # storage unavailable, ...
            return self._verdict_before_charge(reservation, error)
        if isinstance(claimed, StoredAnswer):
            # answered before (a charge or a refusal): its outcome was committed then
            return Verdict.REJECTED if reservation.invalid else Verdict.DONE
        checkpoint = Checkpoint(claimed, self._encode, self._encode_refusal)
        if reservation.command is None:  # breaks the Charge request's rules: refused as such
            invalid = InvalidEvent(reservation.invalid)
            return await self._refused(reservation, claimed, checkpoint, invalid, ctx)
        try:
            payment = await self._charging.charge(reservation.command, ctx, checkpoint)
        except ReportableError as error:
            return await self._refused(reservation, claimed, checkpoint, error, ctx)
        except BaseException:
            await self._keys.release(claimed)
            raise
        if checkpoint.answer is None or payment.status is PaymentStatus.PROCESSING:
            await self._keys.release(claimed)  # the gateway's answer is pending
            return Verdict.RETRY
        return Verdict.DONE

    async def _refused(
        self,
        reservation: Reservation,
        claimed: KeyRecord,
        checkpoint: Checkpoint,
        error: ReportableError,
        ctx: RequestContext,
    ) -> Verdict:
        if checkpoint.answer is not None:
            return self._refusal_done(reservation, error)  # stored with its final change
        kind = self._classify(error)
        if kind is Refusals.RETRYABLE:
            await self._keys.release(claimed)
            log.warning(
                "inventory event %s: charge not possible now (%s), retried later",
                reservation.event_id,
                error.reason,
            )
            return Verdict.RETRY
        # Definite. No payment was made: the refusal is the key's answer and the checkout's
        # `payment.failed`, committed together. A payment exists: its events tell.
        if checkpoint.payment_id is None:
            await self._store_refusal(reservation, claimed, error, ctx)
        else:
            await self._keys.store_answer(claimed, self._encode_refusal(error))
        if kind is Refusals.STORED:
            return self._refusal_done(reservation, error)
        log.error("inventory event %s can never be charged: %s", reservation.event_id, error)
        return Verdict.REJECTED

    async def _store_refusal(
        self,
        reservation: Reservation,
        claimed: KeyRecord,
        error: ReportableError,
        ctx: RequestContext,
    ) -> None:
        refusal = ChargeRefusal(
            event_id=refusal_event_id(reservation.event_id),
            inventory_event_id=reservation.event_id,
            order_id=reservation.order_id,
            reason=error.reason,
            message=error.message,
            trace_id=ctx.trace_id,
            occurred_at=self._clock.now(),
        )
        await self._keys.store_answer(claimed, self._encode_refusal(error), refusal)

    def _verdict_before_charge(self, reservation: Reservation, error: ReportableError) -> Verdict:
        if self._classify(error) is Refusals.RETRYABLE:
            return Verdict.RETRY
        log.error("inventory event %s refused: %s", reservation.event_id, error)
        return Verdict.REJECTED

    @staticmethod
    def _refusal_done(reservation: Reservation, error: ReportableError) -> Verdict:
        # Without a payment, the refusal was published as `payment.failed` (_store_refusal).
        log.warning(
            "inventory event %s: order %s not charged: %s (%s)",
            reservation.event_id,
            reservation.order_id,
            error.reason,
            error.message,
        )
        return Verdict.DONE
