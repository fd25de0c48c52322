"""Our gateway requests -> Stripe parameters; Stripe objects -> our gateway answers."""

from __future__ import annotations

from typing import Any

import stripe

from payment_grpc.domain.payment import CardDetails, Failure, PaymentMethod, PaymentMethodType
from payment_grpc.service.ports import Authorization, AuthorizationOutcome, AuthorizationRequest

# Stripe's test tokens name Stripe's test payment methods (pm_card_visa for tok_visa).
TEST_TOKENS = frozenset(
    {
        "tok_visa",
        "tok_visa_debit",
        "tok_mastercard",
        "tok_amex",
        "tok_discover",
        "tok_chargeDeclined",
        "tok_chargeDeclinedInsufficientFunds",
        "tok_chargeDeclinedExpiredCard",
        "tok_chargeDeclinedProcessingError",
        "tok_chargeDeclinedIncorrectCvc",
        "tok_chargeDeclinedFraudulent",
    }
)
METHOD_DATA_TYPES = {
    PaymentMethodType.UPI: "upi",
    PaymentMethodType.NET_BANKING: "netbanking",
    PaymentMethodType.PAYPAL: "paypal",
}
OUTCOME_OF_STATUS = {
    "requires_capture": AuthorizationOutcome.AUTHORIZED,
    "succeeded": AuthorizationOutcome.CAPTURED,
    "processing": AuthorizationOutcome.PENDING,
    "requires_action": AuthorizationOutcome.PENDING,
    "requires_confirmation": AuthorizationOutcome.PENDING,
    "requires_payment_method": AuthorizationOutcome.DECLINED,
    "canceled": AuthorizationOutcome.DECLINED,
}
PAYMENT_ID_KEY = "payment_id"


def intent_params(request: AuthorizationRequest) -> dict[str, Any]:
    """POST /v1/payment_intents, confirmed at once; card details come back expanded."""
    params: dict[str, Any] = {
        "amount": request.amount.amount_minor,
        "currency": request.amount.currency.lower(),
        "confirm": True,
        "capture_method": "automatic" if request.capture else "manual",
        "metadata": {PAYMENT_ID_KEY: request.payment_id, "gateway_key": request.idempotency_key},
        "expand": ["latest_charge"],
    }
    params.update(payment_method_params(request.method))
    return params


def payment_method_params(method: PaymentMethod) -> dict[str, Any]:
    if method.type in (PaymentMethodType.CARD, PaymentMethodType.WALLET):
        if method.token in TEST_TOKENS:
            return {"payment_method": "pm_card_" + method.token.removeprefix("tok_")}
        # A token from Stripe.js / a wallet: Stripe makes the payment method from it.
        return {"payment_method_data": {"type": "card", "card": {"token": method.token}}}
    kind = METHOD_DATA_TYPES[method.type]
    detail = {
        PaymentMethodType.UPI: {"vpa": method.token},
        PaymentMethodType.NET_BANKING: {"bank": method.bank_code or method.token},
        PaymentMethodType.PAYPAL: {"payer": method.token},
    }[method.type]
    return {"payment_method_data": {"type": kind, kind: detail}}


def authorization(intent: stripe.PaymentIntent) -> Authorization:
    outcome = OUTCOME_OF_STATUS.get(intent.status, AuthorizationOutcome.PENDING)
    failure = None
    if outcome is AuthorizationOutcome.DECLINED:
        failure = intent_failure(intent)
    return Authorization(outcome, intent.id, card_details(intent), failure)


def intent_failure(intent: stripe.PaymentIntent) -> Failure:
    error = getattr(intent, "last_payment_error", None)
    if error is None:
        reason = "payment_intent_canceled" if intent.status == "canceled" else "payment_failed"
        return Failure(reason, f"the payment intent is {intent.status}")
    # A nested error is a plain StripeObject: Stripe leaves out what does not apply (no
    # decline_code unless a card was declined), and a missing key raises AttributeError.
    return Failure(
        str(getattr(error, "code", None) or "payment_failed"),
        str(getattr(error, "message", None) or ""),
        str(getattr(error, "decline_code", None) or ""),
    )


def card_details(intent: stripe.PaymentIntent) -> CardDetails | None:
    # Stripe leaves out fields that do not apply (no `card` for UPI): read them softly.
    charge = getattr(intent, "latest_charge", None)
    details = getattr(charge, "payment_method_details", None)
    card = getattr(details, "card", None)
    if not isinstance(charge, stripe.Charge) or card is None:
        return None
    return CardDetails(
        brand=str(card.brand),
        last4=str(card.last4),
        exp_month=int(card.exp_month),
        exp_year=int(card.exp_year),
        fingerprint=str(card.fingerprint or ""),
    )
