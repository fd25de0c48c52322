"""Refunds of captured payments."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime

from payment_grpc.domain.money import Money


class RefundStatus(enum.StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class RefundReason(enum.StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    DUPLICATE = "DUPLICATE"
    FRAUDULENT = "FRAUDULENT"
    REQUESTED_BY_CUSTOMER = "REQUESTED_BY_CUSTOMER"


@dataclass(frozen=True, slots=True)
class Refund:
    refund_id: str
    payment_id: str
    amount: Money
    reason: RefundReason
    created_at: datetime
    updated_at: datetime
    status: RefundStatus = RefundStatus.PENDING
    gateway_reference: str = ""
    failure_code: str = ""

    def succeeded(self, gateway_reference: str, at: datetime) -> Refund:
        return replace(
            self, status=RefundStatus.SUCCEEDED, gateway_reference=gateway_reference, updated_at=at
        )

    def failed(self, failure_code: str, at: datetime) -> Refund:
        return replace(self, status=RefundStatus.FAILED, failure_code=failure_code, updated_at=at)
