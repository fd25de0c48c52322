"""Stripe's object shapes, built from the simulator engine's records.

Only the fields our adapter (and the Stripe SDK's parser) read, named and typed as in
Stripe's OpenAPI description: PaymentIntent, Charge, Refund, Event and the error envelope.
Amounts are integers in minor units; currencies are lower-case ISO codes, like Stripe's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from payment_grpc.adapters.gateways.engine import ChargeView, LedgerRefund
from payment_grpc.domain.payment import Failure
from payment_grpc.service.ports import AuthorizationOutcome

API_VERSION = "2025-01-27.acacia"


@dataclass(frozen=True, slots=True)
class IntentParams:
    """What the caller chose when creating the PaymentIntent (kept beside the engine's
    ledger by the HTTP simulator: the engine does not know Stripe's vocabulary)."""

    capture_method: str  # "automatic" | "manual"
    method_type: str  # "card", "upi", "netbanking", "paypal"
    metadata: dict[str, str]


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


def intent_status(view: ChargeView) -> str:
    outcome = view.authorization.outcome
    if view.voided:
        return "canceled"
    if outcome is AuthorizationOutcome.PENDING:
        return "processing"
    if outcome is AuthorizationOutcome.DECLINED:
        return "requires_payment_method"
    if outcome is AuthorizationOutcome.AUTHORIZED and view.captured_minor == 0:
        return "requires_capture"
    return "succeeded"


def charge_id(view: ChargeView) -> str:
    return "ch_" + view.reference.split("_", 1)[1]


def payment_intent(view: ChargeView, params: IntentParams, expand_charge: bool) -> dict[str, Any]:
    status = intent_status(view)
    failure = view.authorization.failure
    return {
        "id": view.reference,
        "object": "payment_intent",
        "amount": view.amount.amount_minor,
        "amount_capturable": view.amount.amount_minor if status == "requires_capture" else 0,
        "amount_received": view.captured_minor,
        "currency": view.amount.currency.lower(),
        "status": status,
        "capture_method": params.capture_method,
        "confirmation_method": "automatic",
        "payment_method_types": [params.method_type],
        "created": unix(view.created_at),
        "livemode": False,
        "metadata": dict(params.metadata),
        "cancellation_reason": "requested_by_customer" if view.voided else None,
        "last_payment_error": error_body(failure, "card_error") if failure else None,
        "latest_charge": charge(view, params) if expand_charge else charge_id(view),
    }


def charge(view: ChargeView, params: IntentParams) -> dict[str, Any]:
    authorization = view.authorization
    card = authorization.card
    failure = authorization.failure
    status = {
        AuthorizationOutcome.PENDING: "pending",
        AuthorizationOutcome.DECLINED: "failed",
    }.get(authorization.outcome, "succeeded")
    details: dict[str, Any] = {"type": params.method_type}
    if card is not None:
        details["card"] = {
            "brand": card.brand,
            "last4": card.last4,
            "exp_month": card.exp_month,
            "exp_year": card.exp_year,
            "fingerprint": card.fingerprint,
        }
    return {
        "id": charge_id(view),
        "object": "charge",
        "amount": view.amount.amount_minor,
        "amount_captured": view.captured_minor,
        "amount_refunded": view.refunded_minor,
        "captured": view.captured_minor > 0,
        "refunded": view.captured_minor > 0 and view.refunded_minor >= view.captured_minor,
        "currency": view.amount.currency.lower(),
        "payment_intent": view.reference,
        "status": status,
        "paid": status == "succeeded",
        "failure_code": failure.code if failure else None,
        "failure_message": failure.message if failure else None,
        "payment_method_details": details,
        "created": unix(view.created_at),
        "livemode": False,
        "metadata": dict(params.metadata),
    }


def refund(view: ChargeView, item: LedgerRefund) -> dict[str, Any]:
    return {
        "id": item.reference,
        "object": "refund",
        "amount": item.amount_minor,
        "currency": view.amount.currency.lower(),
        "payment_intent": view.reference,
        "charge": charge_id(view),
        "status": "succeeded",
        "created": unix(item.created_at),
        "metadata": {},
    }


def error_body(failure: Failure, kind: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": kind, "code": failure.code, "message": failure.message}
    if failure.decline_code:
        body["decline_code"] = failure.decline_code
    body.update(extra)
    return body


def envelope(kind: str, message: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    """Stripe's error envelope: {"error": {type, code, message, ...}}."""
    body: dict[str, Any] = {"type": kind, "message": message}
    if code:
        body["code"] = code
    body.update(extra)
    return {"error": body}


def event(kind: str, obj: dict[str, Any], at: datetime, key: str | None) -> dict[str, Any]:
    return {
        "id": f"evt_sim_{uuid.uuid4().hex}",
        "object": "event",
        "type": kind,
        "api_version": API_VERSION,
        "created": unix(at),
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": key},
        "data": {"object": obj},
    }


def list_page(url: str, items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "url": url, "data": items, "has_more": has_more}


def search_page(url: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "object": "search_result",
        "url": url,
        "data": items,
        "has_more": False,
        "next_page": None,
    }
