"""The wire form of a payment event (protos/payments/v1/events.proto): what the outbox
stores and the sinks and feeds send. Built here, where proto <-> domain conversion lives.

`encode_event` runs in the transaction that records the event (the unit of work's commit),
inside the call that made the change: the envelope's W3C traceparent is that call's
current span, captured there, so the relay can continue the trace long after the call
(NATS headers, the order service notification's metadata)."""

from __future__ import annotations

from payments.v1 import events_pb2
from payments.v1 import resources_pb2 as pb

from payment_grpc.api.convert import (
    STATUS_TO_PB,
    cancellation_to_pb,
    failure_to_pb,
    payment_to_pb,
    timestamp,
)
from payment_grpc.domain.payment import Payment, PaymentEvent
from payment_grpc.service.outbox import FAILED, event_id
from payment_grpc.service.ports import ChargeRefusal
from payment_grpc.telemetry.tracing import traceparent_of_trace


class _EventPayments:
    """The payment of each event, converted once per changed payment: a transaction writes
    its events one after the other for the same payment state (created and processing
    for a new charge), and each event's copy differs from it only in the fields an event
    carries (its status, amounts, failure, reason, sequence and time)."""

    def __init__(self) -> None:
        self._last: tuple[Payment, pb.Payment] | None = None  # strong ref: `is` holds

    def converted(self, payment: Payment) -> pb.Payment:
        last = self._last
        if last is None or last[0] is not payment:
            last = self._last = (payment, payment_to_pb(payment))
        return last[1]


_event_payments = _EventPayments()


def _as_of(message: pb.Payment, event: PaymentEvent) -> None:
    """`message` (a copy of the payment) as this event left it (a transaction may write
    several events): the payment's state with the event's own fields."""
    message.status = STATUS_TO_PB[event.status]
    message.captured_amount.amount_minor = event.captured.amount_minor
    message.refunded_amount.amount_minor = event.refunded.amount_minor
    failure = failure_to_pb(event.failure)
    if failure is None:
        message.ClearField("failure")
    else:
        message.failure.CopyFrom(failure)
    message.cancellation_reason = cancellation_to_pb(event.cancellation_reason)
    message.sequence = event.sequence
    message.update_time.CopyFrom(timestamp(event.occurred_at))


def event_message(
    payment: Payment, event: PaymentEvent, kind: str, traceparent: str = ""
) -> events_pb2.PaymentEvent:
    message = events_pb2.PaymentEvent(
        event_id=event_id(event, kind),
        type=kind,
        sequence=event.sequence,
        previous_status=STATUS_TO_PB.get(event.previous_status, pb.PAYMENT_STATUS_UNSPECIFIED),
        occur_time=timestamp(event.occurred_at),
        trace=events_pb2.TraceContext(trace_id=event.trace_id, traceparent=traceparent),
    )
    message.payment.CopyFrom(_event_payments.converted(payment))
    _as_of(message.payment, event)
    return message


def encode_event(payment: Payment, event: PaymentEvent, kind: str) -> bytes:
    """The envelope as stored in the outbox and the feed, with the current traceparent when
    it belongs to the event's trace (a change made by a traced call)."""
    message = event_message(payment, event, kind, traceparent_of_trace(event.trace_id))
    return message.SerializeToString(deterministic=True)


def encode_refusal(refusal: ChargeRefusal) -> bytes:
    """A charge refused without a payment (the checkout saga's answer to an inventory event):
    `payment.failed` with no payment and sequence 0, the refusal saying why."""
    message = events_pb2.PaymentEvent(
        event_id=refusal.event_id,
        type=FAILED,
        occur_time=timestamp(refusal.occurred_at),
        trace=events_pb2.TraceContext(
            trace_id=refusal.trace_id, traceparent=traceparent_of_trace(refusal.trace_id)
        ),
        refusal=events_pb2.ChargeRefusal(
            reason=refusal.reason,
            message=refusal.message,
            order_id=refusal.order_id,
            inventory_event_id=refusal.inventory_event_id,
        ),
    )
    return message.SerializeToString(deterministic=True)
