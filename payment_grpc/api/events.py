"""The wire form of a payment event (protos/payments/v1/events.proto): what the outbox
stores and the sinks and feeds send. Built here, where proto <-> domain conversion lives.

`encode_event` runs in the transaction that records the event (the unit of work's commit),
inside the call that made the change: the envelope's W3C traceparent is that call's
current span, captured there, so the relay can continue the trace long after the call
(NATS headers, the order service notification's metadata)."""

from __future__ import annotations

from dataclasses import replace

from payments.v1 import events_pb2
from payments.v1 import resources_pb2 as pb

from payment_grpc.api.convert import STATUS_TO_PB, payment_to_pb, timestamp
from payment_grpc.domain.payment import Payment, PaymentEvent
from payment_grpc.service.outbox import FAILED, event_id
from payment_grpc.service.ports import ChargeRefusal
from payment_grpc.telemetry.tracing import traceparent_of_trace


def as_of(payment: Payment, event: PaymentEvent) -> Payment:
    """The payment as this event left it (a transaction may write several events)."""
    return replace(
        payment,
        status=event.status,
        captured_minor=event.captured.amount_minor,
        refunded_minor=event.refunded.amount_minor,
        failure=event.failure,
        cancellation_reason=event.cancellation_reason,
        sequence=event.sequence,
        updated_at=event.occurred_at,
    )


def event_message(
    payment: Payment, event: PaymentEvent, kind: str, traceparent: str = ""
) -> events_pb2.PaymentEvent:
    return events_pb2.PaymentEvent(
        event_id=event_id(event, kind),
        type=kind,
        payment=payment_to_pb(as_of(payment, event)),
        sequence=event.sequence,
        previous_status=STATUS_TO_PB.get(event.previous_status, pb.PAYMENT_STATUS_UNSPECIFIED),
        occur_time=timestamp(event.occurred_at),
        trace=events_pb2.TraceContext(trace_id=event.trace_id, traceparent=traceparent),
    )


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
