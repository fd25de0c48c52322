"""Business errors: what the payment rules refuse. Each carries a stable machine-readable
reason and safe metadata.

`ReportableError` is the shape every error the api may report has (domain errors here,
service errors in service/errors.py); the api layer maps each class to a gRPC status
code in one table, resolved along the class's MRO. Nothing here knows gRPC.
"""

from __future__ import annotations


class ReportableError(Exception):
    """An error a caller may be told about: a stable reason and safe metadata (never card
    data). Subclasses are mapped to a status code by the api's one error table."""

    reason: str = "ERROR"
    field: str | None = None  # the request field at fault, when there is one
    default_message: str = ""  # the message of an error that is always told the same way

    def __init__(self, message: str | None = None, **metadata: str) -> None:
        message = self.default_message if message is None else message
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class DomainError(ReportableError):
    """A payment rule refused the request."""

    reason = "PAYMENT_ERROR"


class InvalidAmount(DomainError):
    reason = "INVALID_AMOUNT"


class CurrencyMismatch(DomainError):
    reason = "CURRENCY_MISMATCH"
    field = "amount.currency"

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"currency {actual} does not match the payment's {expected}",
            expectedCurrency=expected,
            currency=actual,
        )


class PaymentNotFound(DomainError):
    reason = "PAYMENT_NOT_FOUND"

    def __init__(self, payment_id: str) -> None:
        super().__init__(f"payment {payment_id} not found", paymentId=payment_id)


class RefundNotFound(DomainError):
    reason = "REFUND_NOT_FOUND"

    def __init__(self, refund_id: str) -> None:
        super().__init__(f"refund {refund_id} not found", refundId=refund_id)


class IllegalTransition(DomainError):
    reason = "PAYMENT_UNEXPECTED_STATE"

    def __init__(self, action: str, current_status: str) -> None:
        super().__init__(
            f"cannot {action} a payment in status {current_status}",
            currentStatus=current_status,
            action=action,
        )


class RefundExceedsAvailable(DomainError):
    reason = "REFUND_EXCEEDS_AVAILABLE"

    def __init__(self, requested: int, available: int, currency: str) -> None:
        super().__init__(
            f"refund of {requested} exceeds the refundable {available} {currency}",
            availableAmountMinor=str(available),
            requestedAmountMinor=str(requested),
            currency=currency,
        )


class CaptureExceedsAuthorized(DomainError):
    reason = "CAPTURE_EXCEEDS_AUTHORIZED"

    def __init__(self, requested: int, authorized: int, currency: str) -> None:
        super().__init__(
            f"capture of {requested} exceeds the authorized {authorized} {currency}",
            authorizedAmountMinor=str(authorized),
            requestedAmountMinor=str(requested),
            currency=currency,
        )


class ActivePaymentExists(DomainError):
    reason = "ORDER_HAS_ACTIVE_PAYMENT"

    def __init__(self, order_id: str, payment_id: str) -> None:
        super().__init__(
            f"order {order_id} already has an active payment",
            orderId=order_id,
            paymentId=payment_id,
        )


class OperationInProgress(DomainError):
    """Another capture/cancel of the same payment is at the gateway; retry shortly."""

    reason = "PAYMENT_OPERATION_IN_PROGRESS"

    def __init__(self, payment_id: str, operation: str) -> None:
        super().__init__(
            f"a {operation} of payment {payment_id} is in progress",
            paymentId=payment_id,
            operation=operation,
        )


class GatewayRejected(DomainError):
    """The gateway refused a capture, void or refund of an existing payment."""

    reason = "GATEWAY_REJECTED"

    def __init__(self, operation: str, code: str) -> None:
        super().__init__(f"the gateway rejected the {operation}: {code}", failureCode=code)


class OrderNotFound(DomainError):
    """The order service does not know the order (a definite answer, stored for the key)."""

    reason = "ORDER_NOT_FOUND"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id} not found", orderId=order_id)


class OrderNotPayable(DomainError):
    reason = "ORDER_NOT_PAYABLE"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"order {order_id} cannot be paid", orderId=order_id)


class OrderMismatch(DomainError):
    """The charge disagrees with the order: the expected values are in the metadata."""

    reason = "ORDER_MISMATCH"

    def __init__(self, order_id: str, mismatched: str, **expected: str) -> None:
        super().__init__(
            f"the charge does not match order {order_id}: {mismatched}",
            orderId=order_id,
            mismatched=mismatched,
            **expected,
        )
