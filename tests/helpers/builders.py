"""Building requests and request metadata."""

from __future__ import annotations

import uuid
from typing import Any

from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

S = pb.PaymentStatus


def order_id() -> str:
    return f"ord_{uuid.uuid4().hex[:16]}"


def usd(amount_minor: int, currency: str = "USD") -> pb.Money:
    return pb.Money(currency=currency, amount_minor=amount_minor)


def card(token: str = "tok_visa") -> pb.PaymentMethod:
    return pb.PaymentMethod(card=pb.CardMethod(token=token))


def charge_request(
    amount: int = 10_000,
    method: pb.PaymentMethod | None = None,
    *,
    manual: bool = False,
    **fields: Any,
) -> api.ChargeRequest:
    fields.setdefault("order_id", order_id())
    return api.ChargeRequest(
        amount=usd(amount) if "currency" not in fields else usd(amount, fields.pop("currency")),
        payment_method=method or card(),
        capture_method=pb.CAPTURE_METHOD_MANUAL if manual else pb.CAPTURE_METHOD_AUTOMATIC,
        **fields,
    )


def keyed(key: str) -> tuple[tuple[str, str], ...]:
    return (("idempotency-key", key),)
