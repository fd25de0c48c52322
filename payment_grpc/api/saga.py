"""The transport side of the checkout saga: an `inventory.v1.reserved` message (protobuf
`inventory.v1.InventoryReserved`, W3C `traceparent` header) -> the CheckoutSaga use case.

Like a servicer method: decode and validate (the Charge request's own protovalidate rules,
the idempotency key's rules), convert, call one use case, map the refusals with the one
error table. The message's trace is continued: the payment's events and the outbox messages
carry it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

import grpc
from google.protobuf.message import DecodeError
from inventory.v1 import inventory_events_pb2
from opentelemetry import trace
from payments.v1 import payment_service_pb2 as api

from payment_grpc.api.convert import charge_command
from payment_grpc.api.errors import code_for
from payment_grpc.api.interceptors.idempotency import valid_key
from payment_grpc.api.validation import violations
from payment_grpc.domain.errors import ReportableError
from payment_grpc.service.context import RequestContext
from payment_grpc.service.errors import InvalidIdempotencyKey
from payment_grpc.service.outbox import SAGA_EVENT_KEY
from payment_grpc.service.saga import (
    KEY_PREFIX,
    SAGA_SUBJECT,
    CheckoutSaga,
    Refusals,
    Reservation,
    Verdict,
)
from payment_grpc.telemetry import tracing

log = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    }
)
# Not a definite answer about the order, and no retry will change it.
INVALID_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


def classify(error: ReportableError) -> Refusals:
    code = code_for(error)
    if code in RETRYABLE_CODES:
        return Refusals.RETRYABLE
    if code in INVALID_CODES:
        return Refusals.INVALID
    return Refusals.STORED


def charge_request(event: inventory_events_pb2.InventoryReserved) -> api.ChargeRequest:
    """The Charge the event asks for; its metadata names the event (the saga's mark)."""
    return api.ChargeRequest(
        order_id=event.order_id,
        amount=event.amount,
        payment_method=event.payment_method,
        capture_method=event.capture_method,
        customer_id=event.customer_id,
        metadata={SAGA_EVENT_KEY: event.event_id},
    )


def reservation_of(data: bytes) -> Reservation | str:
    """The reservation in a message, or why it can never be charged nor answered (no event
    id to answer for). An event that breaks the Charge request's rules is a reservation
    without a command: its refusal is answered (`payment.failed`) once, like any other."""
    try:
        event = inventory_events_pb2.InventoryReserved.FromString(data)
    except DecodeError:
        return "not an inventory.v1.InventoryReserved"
    try:
        valid_key(KEY_PREFIX + event.event_id)
    except InvalidIdempotencyKey:
        return "event_id is empty, too long or not printable ASCII"
    if not event.event_id:
        return "event_id is empty"
    request = charge_request(event)
    fingerprint = hashlib.sha256(b"inventory.v1.reserved\0" + request.SerializeToString(
        deterministic=True
    )).hexdigest()  # fmt: skip
    problems = violations(request)
    if problems:
        invalid = "; ".join(f"{path}: {why}" for path, why in problems)
        return Reservation(event.event_id, event.order_id, None, fingerprint, invalid)
    return Reservation(event.event_id, event.order_id, charge_command(request), fingerprint)


class InventoryReservedHandler:
    """Called by the broker adapter for each message; its verdict decides ack/nak/term."""

    def __init__(self, saga: CheckoutSaga) -> None:
        self._saga = saga

    async def __call__(self, data: bytes, headers: Mapping[str, str]) -> Verdict:
        reservation = reservation_of(data)
        if isinstance(reservation, str):
            log.error("inventory.v1.reserved message dropped: %s", reservation)
            return Verdict.REJECTED
        with (
            tracing.continued(headers.get("traceparent", "")),
            tracing.messaging_span("inventory.v1.reserved", "process"),
        ):
            trace_id = tracing.trace_id_of(trace.get_current_span()) or tracing.new_trace_id()
            ctx = RequestContext(subject=SAGA_SUBJECT, trace_id=trace_id)
            return await self._saga.on_reserved(reservation, ctx)
