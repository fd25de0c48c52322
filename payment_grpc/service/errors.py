"""Errors of the service itself, not of the payment rules: who may call, idempotency keys,
paging, storage and timing. The api maps them in the same table as the domain's errors
(both are ReportableErrors)."""

from __future__ import annotations

from payment_grpc.domain.errors import ReportableError


class ServiceError(ReportableError):
    """The service cannot take the request as it is, or not now."""

    reason = "SERVICE_ERROR"


class InvalidPageToken(ServiceError):
    reason = "INVALID_PAGE_TOKEN"
    field = "page_token"
    default_message = "page_token is invalid or does not match the request's filters"


class StorageUnavailable(ServiceError):
    """The database cannot be reached; the caller may retry."""

    reason = "STORAGE_UNAVAILABLE"


class ConcurrentModification(ServiceError):
    """The row changed under us (optimistic check); the caller may retry."""

    reason = "CONCURRENT_MODIFICATION"


class OutcomePending(ServiceError):
    """The gateway did not answer in time; the operation finishes in the background."""

    reason = "GATEWAY_OUTCOME_PENDING"

    def __init__(self, operation: str, payment_id: str) -> None:
        super().__init__(
            f"the gateway has not confirmed the {operation} yet; it will be completed",
            paymentId=payment_id,
        )


class IdempotencyKeyReused(ServiceError):
    """The key was used before with a different request."""

    reason = "IDEMPOTENCY_KEY_REUSED"
    default_message = "this idempotency-key was already used with a different request"


class IdempotencyKeyInUse(ServiceError):
    """The first request with this key is still running; retry after it finishes."""

    reason = "IDEMPOTENCY_KEY_IN_USE"
    default_message = "a request with this idempotency-key is still in progress; retry"


class InvalidIdempotencyKey(ServiceError):
    reason = "INVALID_IDEMPOTENCY_KEY"
    field = "idempotency-key"
    default_message = "metadata idempotency-key is required: 1-255 printable ASCII characters"


class Unauthenticated(ServiceError):
    """Deliberately vague: nothing here helps an attacker tell why a token failed."""

    reason = "UNAUTHENTICATED"
    default_message = "missing or invalid credentials"


class PermissionDenied(ServiceError):
    reason = "PERMISSION_DENIED"

    def __init__(self, required_scope: str) -> None:
        super().__init__(
            f"the token lacks the scope {required_scope}", requiredScope=required_scope
        )


class AuthUnavailable(ServiceError):
    """The auth service cannot be reached and no cached answer exists: fail closed."""

    reason = "AUTH_UNAVAILABLE"
    default_message = "token verification is unavailable; retry"


class OrderServiceUnavailable(ServiceError):
    """The order service could not answer (down, slow, or its breaker is open); retry."""

    reason = "ORDER_SERVICE_UNAVAILABLE"
    default_message = "the order service is unavailable; retry"


class InvalidCursor(ServiceError):
    reason = "INVALID_CURSOR"
    field = "cursor"
    default_message = "cursor is invalid: pass one a WatchPayments response carried"


class InvalidEvent(ServiceError):
    """An inbound event whose content breaks the rules of the request it stands for (the
    saga's inventory event: the Charge request's own rules); never chargeable as it is."""

    reason = "INVALID_ARGUMENT"
