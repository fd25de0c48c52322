"""Domain objects <-> table rows. Sensitive columns are encrypted here (FieldCipher), so
the domain never sees ciphertext and the tables never hold the plaintext."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import RowMapping

from payment_grpc.adapters.db.crypto import FieldCipher
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import (
    CancellationReason,
    CaptureMethod,
    CardDetails,
    Failure,
    Payment,
    PaymentEvent,
    PaymentMethod,
    PaymentMethodType,
    PaymentStatus,
)
from payment_grpc.domain.refund import Refund, RefundReason, RefundStatus


def _failure_columns(failure: Failure | None) -> dict[str, Any]:
    return {
        "failure_code": failure.code if failure else None,
        "failure_decline_code": failure.decline_code if failure else None,
        "failure_message": failure.message if failure else None,
    }


def _cancellation_reason(row: RowMapping | Mapping[str, Any]) -> CancellationReason | None:
    reason = row["cancellation_reason"]
    return CancellationReason(reason) if reason is not None else None


def _failure(row: RowMapping | Mapping[str, Any]) -> Failure | None:
    if row["failure_code"] is None:
        return None
    return Failure(
        row["failure_code"], row["failure_message"] or "", row["failure_decline_code"] or ""
    )


# The encrypted columns of `payments`; the AAD names the column and the payment id.
METHOD_TOKEN = "payments.method_token"  # noqa: S105 - a column name, not a secret
METADATA_JSON = "payments.metadata_json"
CARD_FINGERPRINT = "payments.card_fingerprint"
# Each encrypted column of `payments` and the name its AAD carries (rotate-keys walks them).
ENCRYPTED_PAYMENT_COLUMNS = {
    "method_token": METHOD_TOKEN,
    "metadata_json": METADATA_JSON,
    "card_fingerprint": CARD_FINGERPRINT,
}


def _encrypted_columns(p: Payment, cipher: FieldCipher) -> dict[str, Any]:
    metadata_json = json.dumps(dict(p.metadata), sort_keys=True)
    fingerprint = p.card.fingerprint if p.card else ""
    return {
        "method_token": cipher.encrypt(p.method.token, column=METHOD_TOKEN, row_id=p.payment_id),
        "metadata_json": cipher.encrypt(metadata_json, column=METADATA_JSON, row_id=p.payment_id),
        "card_fingerprint": cipher.encrypt(
            fingerprint, column=CARD_FINGERPRINT, row_id=p.payment_id
        )
        if fingerprint
        else None,
    }


def _plain_columns(p: Payment) -> dict[str, Any]:
    card = p.card
    return {
        "id": p.payment_id,
        "order_id": p.order_id,
        "customer_id": p.customer_id,
        "currency": p.amount.currency,
        "amount_minor": p.amount.amount_minor,
        "captured_minor": p.captured_minor,
        "refunded_minor": p.refunded_minor,
        "status": p.status.value,
        "capture_method": p.capture_method.value,
        "method_type": p.method.type.value,
        "wallet_provider": p.method.wallet_provider,
        "bank_code": p.method.bank_code,
        "card_brand": card.brand if card else None,
        "card_last4": card.last4 if card else None,
        "card_exp_month": card.exp_month if card else None,
        "card_exp_year": card.exp_year if card else None,
        **_failure_columns(p.failure),
        "cancellation_reason": p.cancellation_reason.value if p.cancellation_reason else None,
        "gateway_reference": p.gateway_reference,
        "sequence": p.sequence,
        "in_flight": p.in_flight,
        "description": p.description,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    }


def payment_to_row(p: Payment, cipher: FieldCipher) -> dict[str, Any]:
    return {**_plain_columns(p), **_encrypted_columns(p, cipher)}


def payment_changes(before: Payment, after: Payment, cipher: FieldCipher) -> dict[str, Any]:
    """UPDATE values for `after`: the encrypted columns only when their plaintext changed
    (method and metadata never do today; the card arrives once, with the authorization), so
    a save costs no encryption and never rewrites a value that a concurrent `rotate-keys`
    just re-encrypted."""
    row = _plain_columns(after)
    if (before.method, before.metadata, before.card) != (after.method, after.metadata, after.card):
        row.update(_encrypted_columns(after, cipher))
    return row


def row_to_payment(row: RowMapping | Mapping[str, Any], cipher: FieldCipher) -> Payment:
    payment_id = row["id"]
    card = None
    if row["card_brand"] is not None:
        fingerprint = row["card_fingerprint"]
        card = CardDetails(
            row["card_brand"],
            row["card_last4"],
            row["card_exp_month"],
            row["card_exp_year"],
            cipher.decrypt(fingerprint, column=CARD_FINGERPRINT, row_id=payment_id)
            if fingerprint
            else "",
        )
    return Payment(
        payment_id=row["id"],
        order_id=row["order_id"],
        customer_id=row["customer_id"],
        amount=Money(row["currency"], row["amount_minor"]),
        capture_method=CaptureMethod(row["capture_method"]),
        method=PaymentMethod(
            PaymentMethodType(row["method_type"]),
            cipher.decrypt(row["method_token"], column=METHOD_TOKEN, row_id=payment_id),
            row["wallet_provider"],
            row["bank_code"],
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        status=PaymentStatus(row["status"]),
        captured_minor=row["captured_minor"],
        refunded_minor=row["refunded_minor"],
        card=card,
        failure=_failure(row),
        cancellation_reason=_cancellation_reason(row),
        gateway_reference=row["gateway_reference"],
        sequence=row["sequence"],
        description=row["description"],
        metadata=json.loads(
            cipher.decrypt(row["metadata_json"], column=METADATA_JSON, row_id=payment_id)
        ),
        in_flight=row["in_flight"],
    )


def event_to_row(e: PaymentEvent) -> dict[str, Any]:
    return {
        "payment_id": e.payment_id,
        "sequence": e.sequence,
        "previous_status": e.previous_status.value if e.previous_status else None,
        "status": e.status.value,
        "currency": e.amount.currency,
        "amount_minor": e.amount.amount_minor,
        "captured_minor": e.captured.amount_minor,
        "refunded_minor": e.refunded.amount_minor,
        **_failure_columns(e.failure),
        "actor": e.actor,
        "trace_id": e.trace_id,
        "occurred_at": e.occurred_at,
        "reason": e.reason or None,
        "cancellation_reason": e.cancellation_reason.value if e.cancellation_reason else None,
    }


def row_to_event(row: RowMapping) -> PaymentEvent:
    currency = row["currency"]
    return PaymentEvent(
        payment_id=row["payment_id"],
        sequence=row["sequence"],
        previous_status=PaymentStatus(row["previous_status"]) if row["previous_status"] else None,
        status=PaymentStatus(row["status"]),
        amount=Money(currency, row["amount_minor"]),
        captured=Money(currency, row["captured_minor"]),
        refunded=Money(currency, row["refunded_minor"]),
        failure=_failure(row),
        actor=row["actor"],
        trace_id=row["trace_id"],
        occurred_at=row["occurred_at"],
        reason=row["reason"] or "",
        cancellation_reason=_cancellation_reason(row),
    )


def refund_to_row(r: Refund) -> dict[str, Any]:
    return {
        "id": r.refund_id,
        "payment_id": r.payment_id,
        "currency": r.amount.currency,
        "amount_minor": r.amount.amount_minor,
        "status": r.status.value,
        "reason": r.reason.value,
        "gateway_reference": r.gateway_reference,
        "failure_code": r.failure_code,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }


def row_to_refund(row: RowMapping) -> Refund:
    return Refund(
        refund_id=row["id"],
        payment_id=row["payment_id"],
        amount=Money(row["currency"], row["amount_minor"]),
        reason=RefundReason(row["reason"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        status=RefundStatus(row["status"]),
        gateway_reference=row["gateway_reference"],
        failure_code=row["failure_code"],
    )
