"""Protobuf <-> domain. The only place that knows both shapes."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import (
    CancellationReason,
    CaptureMethod,
    Failure,
    Payment,
    PaymentEvent,
    PaymentMethod,
    PaymentMethodType,
    PaymentStatus,
)
from payment_grpc.domain.refund import Refund, RefundReason, RefundStatus
from payment_grpc.service.charging import ChargeCommand
from payment_grpc.service.ports import FeedFilter, PaymentFilter


def _enum_map(prefix: str, enum_type: type[enum.StrEnum], proto_enum: Any) -> dict[Any, Any]:
    """Domain enum member -> proto enum number, by the shared value names."""
    return {member: proto_enum.Value(f"{prefix}{member.value}") for member in enum_type}


STATUS_TO_PB = _enum_map("PAYMENT_STATUS_", PaymentStatus, pb.PaymentStatus)
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}
CAPTURE_TO_PB = _enum_map("CAPTURE_METHOD_", CaptureMethod, pb.CaptureMethod)
METHOD_TYPE_TO_PB = _enum_map("PAYMENT_METHOD_TYPE_", PaymentMethodType, pb.PaymentMethodType)
REFUND_STATUS_TO_PB = _enum_map("REFUND_STATUS_", RefundStatus, pb.RefundStatus)
REASON_TO_PB = _enum_map("REFUND_REASON_", RefundReason, pb.RefundReason)
REASON_FROM_PB = {v: k for k, v in REASON_TO_PB.items()}
CANCELLATION_TO_PB = _enum_map("CANCELLATION_REASON_", CancellationReason, pb.CancellationReason)


def cancellation_to_pb(reason: CancellationReason | None) -> pb.CancellationReason.ValueType:
    return CANCELLATION_TO_PB[reason] if reason else pb.CANCELLATION_REASON_UNSPECIFIED


def money_to_pb(money: Money) -> pb.Money:
    return pb.Money(currency=money.currency, amount_minor=money.amount_minor)


def money_from_pb(money: pb.Money) -> Money:
    return Money(money.currency, money.amount_minor)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_TIMESTAMP_SECONDS = range(-62_135_596_800, 253_402_300_800)  # 0001-01-01 .. 9999-12-31


def timestamp(at: datetime) -> Timestamp:
    """What Timestamp.FromDatetime gives (a naive datetime is UTC), without its detour
    through a struct_time: several of these go into every answer and event."""
    seconds = (at if at.utcoffset() is not None else at.replace(tzinfo=UTC)) - _EPOCH
    whole = seconds // _SECOND
    if whole not in _TIMESTAMP_SECONDS:
        raise ValueError(f"Timestamp is not valid: Seconds {whole} out of range")
    return Timestamp(seconds=whole, nanos=at.microsecond * 1000)


def datetime_of(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(UTC)


def method_from_pb(method: pb.PaymentMethod) -> PaymentMethod:
    kind = method.WhichOneof("kind")
    if kind == "card":
        return PaymentMethod(PaymentMethodType.CARD, token=method.card.token)
    if kind == "upi":
        return PaymentMethod(PaymentMethodType.UPI, token=method.upi.vpa)
    if kind == "wallet":
        return PaymentMethod(
            PaymentMethodType.WALLET,
            token=method.wallet.token,
            wallet_provider=method.wallet.provider,
        )
    if kind == "net_banking":
        return PaymentMethod(PaymentMethodType.NET_BANKING, bank_code=method.net_banking.bank_code)
    if kind == "paypal":
        return PaymentMethod(PaymentMethodType.PAYPAL, token=method.paypal.payer_token)
    return PaymentMethod(PaymentMethodType.COD)


def charge_command(request: api.ChargeRequest) -> ChargeCommand:
    capture = (
        CaptureMethod.MANUAL
        if request.capture_method == pb.CAPTURE_METHOD_MANUAL
        else CaptureMethod.AUTOMATIC
    )
    return ChargeCommand(
        order_id=request.order_id,
        amount=money_from_pb(request.amount),
        method=method_from_pb(request.payment_method),
        capture_method=capture,
        customer_id=request.customer_id,
        description=request.description,
        metadata=dict(request.metadata),
    )


def optional_amount(request: api.CapturePaymentRequest | api.RefundRequest) -> Money | None:
    return money_from_pb(request.amount) if request.HasField("amount") else None


def payment_filter(request: api.ListPaymentsRequest) -> PaymentFilter:
    status = STATUS_FROM_PB.get(request.status) if request.status else None
    return PaymentFilter(request.order_id, request.customer_id, status)


def failure_to_pb(failure: Failure | None) -> pb.PaymentFailure | None:
    if failure is None:
        return None
    return pb.PaymentFailure(
        code=failure.code, decline_code=failure.decline_code, message=failure.message
    )


def payment_to_pb(p: Payment) -> pb.Payment:
    card = p.card
    details = pb.PaymentMethodDetails(
        type=METHOD_TYPE_TO_PB[p.method.type],
        wallet_provider=p.method.wallet_provider,
        bank_code=p.method.bank_code,
        card=None
        if card is None
        else pb.CardDetails(
            brand=card.brand, last4=card.last4, exp_month=card.exp_month, exp_year=card.exp_year
        ),
    )
    return pb.Payment(
        payment_id=p.payment_id,
        order_id=p.order_id,
        customer_id=p.customer_id,
        amount=money_to_pb(p.amount),
        captured_amount=money_to_pb(p.captured),
        refunded_amount=money_to_pb(p.refunded),
        status=STATUS_TO_PB[p.status],
        capture_method=CAPTURE_TO_PB[p.capture_method],
        payment_method=details,
        failure=failure_to_pb(p.failure),
        gateway_reference=p.gateway_reference,
        sequence=p.sequence,
        create_time=timestamp(p.created_at),
        update_time=timestamp(p.updated_at),
        metadata=dict(p.metadata),
        description=p.description,
        cancellation_reason=cancellation_to_pb(p.cancellation_reason),
    )


def refund_to_pb(r: Refund) -> pb.Refund:
    return pb.Refund(
        refund_id=r.refund_id,
        payment_id=r.payment_id,
        amount=money_to_pb(r.amount),
        status=REFUND_STATUS_TO_PB[r.status],
        reason=REASON_TO_PB[r.reason],
        gateway_reference=r.gateway_reference,
        create_time=timestamp(r.created_at),
        update_time=timestamp(r.updated_at),
    )


def event_to_pb(e: PaymentEvent) -> pb.PaymentStatusEvent:
    return pb.PaymentStatusEvent(
        payment_id=e.payment_id,
        sequence=e.sequence,
        previous_status=STATUS_TO_PB.get(e.previous_status, pb.PAYMENT_STATUS_UNSPECIFIED),
        status=STATUS_TO_PB[e.status],
        amount=money_to_pb(e.amount),
        captured_amount=money_to_pb(e.captured),
        refunded_amount=money_to_pb(e.refunded),
        failure=failure_to_pb(e.failure),
        event_time=timestamp(e.occurred_at),
        cancellation_reason=cancellation_to_pb(e.cancellation_reason),
    )


def feed_filter(request: api.WatchPaymentsRequest) -> FeedFilter:
    return FeedFilter(
        order_id=request.order_id,
        customer_id=request.customer_id,
        statuses=frozenset(STATUS_FROM_PB[s] for s in request.statuses if s in STATUS_FROM_PB),
    )
