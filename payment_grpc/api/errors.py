"""The one error table: domain error -> gRPC status code + google.rpc details (AIP-193)."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from payment_grpc.domain import errors as e

DOMAIN = "payments.v1"

# (status code, retry delay in seconds or None). Order matters only for subclasses.
ERROR_TABLE: dict[type[e.DomainError], tuple[grpc.StatusCode, float | None]] = {
    e.InvalidAmount: (grpc.StatusCode.INVALID_ARGUMENT, None),
    e.CurrencyMismatch: (grpc.StatusCode.INVALID_ARGUMENT, None),
    e.InvalidPageToken: (grpc.StatusCode.INVALID_ARGUMENT, None),
    e.PaymentNotFound: (grpc.StatusCode.NOT_FOUND, None),
    e.RefundNotFound: (grpc.StatusCode.NOT_FOUND, None),
    e.IllegalTransition: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.RefundExceedsAvailable: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.CaptureExceedsAuthorized: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.GatewayRejected: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.ActivePaymentExists: (grpc.StatusCode.ALREADY_EXISTS, None),
    e.InvalidIdempotencyKey: (grpc.StatusCode.INVALID_ARGUMENT, None),
    e.IdempotencyKeyReused: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.IdempotencyKeyInUse: (grpc.StatusCode.ABORTED, 0.5),
    e.Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, None),
    e.PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, None),
    e.AuthUnavailable: (grpc.StatusCode.UNAVAILABLE, 1.0),
    e.OperationInProgress: (grpc.StatusCode.ABORTED, 1.0),
    e.ConcurrentModification: (grpc.StatusCode.ABORTED, 0.1),
    e.OutcomePending: (grpc.StatusCode.UNAVAILABLE, 5.0),
    e.StorageUnavailable: (grpc.StatusCode.UNAVAILABLE, 1.0),
    e.GatewayUnavailable: (grpc.StatusCode.UNAVAILABLE, 1.0),
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def build_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str] | None = None,
    *,
    retry_after_s: float | None = None,
    violations: Iterable[tuple[str, str]] = (),
) -> grpc.Status:
    return rpc_status.to_status(
        build_status_proto(
            code, message, reason, metadata, retry_after_s=retry_after_s, violations=violations
        )
    )


def build_status_proto(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str] | None = None,
    *,
    retry_after_s: float | None = None,
    violations: Iterable[tuple[str, str]] = (),
) -> status_pb2.Status:
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {}))
    ]
    field_violations = [
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
    ]
    if field_violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=field_violations)))
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)


def _entry(error: e.DomainError) -> tuple[grpc.StatusCode, float | None]:
    return ERROR_TABLE.get(type(error), (grpc.StatusCode.INTERNAL, None))


def code_for(error: e.DomainError) -> grpc.StatusCode:
    return _entry(error)[0]


def status_proto_for(error: e.DomainError) -> status_pb2.Status:
    code, retry = _entry(error)
    if code is grpc.StatusCode.INTERNAL:
        return build_status_proto(code, "internal error", "INTERNAL")
    violations = [(error.field, error.message)] if error.field else []
    return build_status_proto(
        code,
        error.message,
        error.reason,
        error.metadata,
        retry_after_s=retry,
        violations=violations,
    )


def status_for(error: e.DomainError) -> grpc.Status:
    return rpc_status.to_status(status_proto_for(error))


def invalid_argument(
    violations: list[tuple[str, str]], reason: str = "INVALID_ARGUMENT"
) -> grpc.Status:
    fields = ", ".join(sorted({f for f, _ in violations}))
    return build_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"invalid request: {fields}",
        reason,
        violations=violations,
    )


INTERNAL = build_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL")
