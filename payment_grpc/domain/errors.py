"""Domain errors. Each carries a stable machine-readable reason and safe metadata.

The api layer maps each class to a gRPC status code in one table; nothing here knows gRPC.
"""

from __future__ import annotations


class DomainError(Exception):
    reason: str = "PAYMENT_ERROR"
    field: str | None = None  # the request field at fault, when there is one

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


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


class InvalidPageToken(DomainError):
    reason = "INVALID_PAGE_TOKEN"
    field = "page_token"

    def __init__(self) -> None:
        super().__init__("page_token is invalid or does not match the request's filters")


class StorageUnavailable(DomainError):
    """The database cannot be reached; the caller may retry."""

    reason = "STORAGE_UNAVAILABLE"


class GatewayUnavailable(DomainError):
    """The gateway could not be reached before anything was sent; safe to retry."""

    reason = "GATEWAY_UNAVAILABLE"


class OperationInProgress(DomainError):
    """Another capture/cancel of the same payment is at the gateway; retry shortly."""

    reason = "PAYMENT_OPERATION_IN_PROGRESS"

    def __init__(self, payment_id: str, operation: str) -> None:
        super().__init__(
            f"a {operation} of payment {payment_id} is in progress",
            paymentId=payment_id,
            operation=operation,
        )


class ConcurrentModification(DomainError):
    """The row changed under us (optimistic check); the caller may retry."""

    reason = "CONCURRENT_MODIFICATION"


class GatewayRejected(DomainError):
    """The gateway refused a capture, void or refund of an existing payment."""

    reason = "GATEWAY_REJECTED"

    def __init__(self, operation: str, code: str) -> None:
        super().__init__(f"the gateway rejected the {operation}: {code}", failureCode=code)


class OutcomePending(DomainError):
    """The gateway did not answer in time; the operation finishes in the background."""

    reason = "GATEWAY_OUTCOME_PENDING"

    def __init__(self, operation: str, payment_id: str) -> None:
        super().__init__(
            f"the gateway has not confirmed the {operation} yet; it will be completed",
            paymentId=payment_id,
        )


class IdempotencyKeyReused(DomainError):
    """The key was used before with a different request."""

    reason = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self) -> None:
        super().__init__("this idempotency-key was already used with a different request")


class IdempotencyKeyInUse(DomainError):
    """The first request with this key is still running; retry after it finishes."""

    reason = "IDEMPOTENCY_KEY_IN_USE"

    def __init__(self) -> None:
        super().__init__("a request with this idempotency-key is still in progress; retry")


class InvalidIdempotencyKey(DomainError):
    reason = "INVALID_IDEMPOTENCY_KEY"
    field = "idempotency-key"

    def __init__(self) -> None:
        super().__init__("metadata idempotency-key is required: 1-255 printable ASCII characters")


class Unauthenticated(DomainError):
    """Deliberately vague: nothing here helps an attacker tell why a token failed."""

    reason = "UNAUTHENTICATED"

    def __init__(self) -> None:
        super().__init__("missing or invalid credentials")


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"

    def __init__(self, required_scope: str) -> None:
        super().__init__(
            f"the token lacks the scope {required_scope}", requiredScope=required_scope
        )


class AuthUnavailable(DomainError):
    """The auth service cannot be reached and no cached answer exists: fail closed."""

    reason = "AUTH_UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__("token verification is unavailable; retry")
