"""The one error table: domain error -> gRPC status code + google.rpc details (AIP-193)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, ParamSpec

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from payment_grpc.domain import errors as e
from payment_grpc.service import errors as s
from payment_grpc.service import ports as gateway

log = logging.getLogger(__name__)
P = ParamSpec("P")

DOMAIN = "payments.v1"

# (status code, retry delay in seconds or None), looked up along the error's MRO: the
# most specific mapped class wins. tests/unit/test_error_table.py checks that every
# ReportableError of the package resolves to an entry here.
ERROR_TABLE: dict[type[e.ReportableError], tuple[grpc.StatusCode, float | None]] = {
    e.InvalidAmount: (grpc.StatusCode.INVALID_ARGUMENT, None),
    e.CurrencyMismatch: (grpc.StatusCode.INVALID_ARGUMENT, None),
    e.PaymentNotFound: (grpc.StatusCode.NOT_FOUND, None),
    e.RefundNotFound: (grpc.StatusCode.NOT_FOUND, None),
    e.IllegalTransition: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.RefundExceedsAvailable: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.CaptureExceedsAuthorized: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.GatewayRejected: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.ActivePaymentExists: (grpc.StatusCode.ALREADY_EXISTS, None),
    e.OperationInProgress: (grpc.StatusCode.ABORTED, 1.0),
    s.InvalidPageToken: (grpc.StatusCode.INVALID_ARGUMENT, None),
    s.InvalidIdempotencyKey: (grpc.StatusCode.INVALID_ARGUMENT, None),
    s.IdempotencyKeyReused: (grpc.StatusCode.FAILED_PRECONDITION, None),
    s.IdempotencyKeyInUse: (grpc.StatusCode.ABORTED, 0.5),
    s.Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, None),
    s.PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, None),
    s.AuthUnavailable: (grpc.StatusCode.UNAVAILABLE, 1.0),
    s.ConcurrentModification: (grpc.StatusCode.ABORTED, 0.1),
    s.OutcomePending: (grpc.StatusCode.UNAVAILABLE, 5.0),
    s.StorageUnavailable: (grpc.StatusCode.UNAVAILABLE, 1.0),
    # A gateway call error that reaches the caller: unknown outcome and nothing sent
    # are retryable (the key resumes); a refused call is our fault, not the caller's.
    gateway.GatewayTimeout: (grpc.StatusCode.UNAVAILABLE, 1.0),
    gateway.GatewayUnreachable: (grpc.StatusCode.UNAVAILABLE, 1.0),
    gateway.GatewayRefused: (grpc.StatusCode.INTERNAL, None),
    e.OrderNotFound: (grpc.StatusCode.NOT_FOUND, None),
    e.OrderNotPayable: (grpc.StatusCode.FAILED_PRECONDITION, None),
    e.OrderMismatch: (grpc.StatusCode.FAILED_PRECONDITION, None),
    s.OrderServiceUnavailable: (grpc.StatusCode.UNAVAILABLE, 1.0),
    s.InvalidCursor: (grpc.StatusCode.INVALID_ARGUMENT, None),
    s.InvalidEvent: (grpc.StatusCode.INVALID_ARGUMENT, None),
}
UNMAPPED = (grpc.StatusCode.INTERNAL, None)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


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


def _as_status(build: Callable[P, status_pb2.Status]) -> Callable[P, grpc.Status]:
    def built(*args: P.args, **kwargs: P.kwargs) -> grpc.Status:
        return rpc_status.to_status(build(*args, **kwargs))

    return built


# The same, as the grpc.Status that abort_with sends.
build_status = _as_status(build_status_proto)


_resolved: dict[type[e.ReportableError], tuple[grpc.StatusCode, float | None]] = {}


def entry_for(error_class: type[e.ReportableError]) -> tuple[grpc.StatusCode, float | None]:
    """The table's entry for the most specific mapped class in the MRO. An unmapped class
    is a bug (it falls through to INTERNAL): logged once per class, at ERROR."""
    entry = _resolved.get(error_class)
    if entry is None:
        mapped = next((c for c in error_class.__mro__ if c in ERROR_TABLE), None)
        if mapped is None:
            log.error("%s has no entry in the error table: INTERNAL", error_class.__name__)
        entry = _resolved[error_class] = ERROR_TABLE[mapped] if mapped else UNMAPPED
    return entry


def code_for(error: e.ReportableError) -> grpc.StatusCode:
    return entry_for(type(error))[0]


def status_proto_for(error: e.ReportableError) -> status_pb2.Status:
    code, retry = entry_for(type(error))
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


def status_for(error: e.ReportableError) -> grpc.Status:
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


async def abort_with(context: aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    """End the call with `status` (its code, message and google.rpc details)."""
    # grpc-stubs 1.53 lacks aio's abort_with_status (present in grpcio since 1.38).
    aborting: Any = context
    await aborting.abort_with_status(status)
    raise AssertionError("abort_with_status returned")
