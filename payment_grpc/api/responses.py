"""The response of each money-moving RPC for its use case's result. The servicer sends
it, and its deterministic serialization is the idempotency key's stored answer (written
by the use case's checkpoint through api/context.Response, which converts once, or by
the recovery worker when the caller is gone); a business refusal is stored as its status
code and google.rpc.Status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message
from payments.v1 import payment_service_pb2 as api

from payment_grpc.api import convert
from payment_grpc.api.errors import code_for, status_proto_for
from payment_grpc.api.methods import payment_method
from payment_grpc.domain.errors import ReportableError
from payment_grpc.domain.payment import Payment
from payment_grpc.domain.refund import Refund
from payment_grpc.service.ports import Operation, StoredAnswer


def charge_response(payment: Payment) -> api.ChargeResponse:
    return api.ChargeResponse(payment=convert.payment_to_pb(payment))


def capture_response(payment: Payment) -> api.CapturePaymentResponse:
    return api.CapturePaymentResponse(payment=convert.payment_to_pb(payment))


def cancel_response(payment: Payment) -> api.CancelPaymentResponse:
    return api.CancelPaymentResponse(payment=convert.payment_to_pb(payment))


def refund_response(result: tuple[Refund, Payment]) -> api.RefundResponse:
    refund, payment = result
    return api.RefundResponse(
        refund=convert.refund_to_pb(refund), payment=convert.payment_to_pb(payment)
    )


# The keyed RPCs (those that need an idempotency-key): the operation each one is.
OPERATIONS: dict[str, Operation] = {
    payment_method("Charge"): Operation.CHARGE,
    payment_method("CapturePayment"): Operation.CAPTURE,
    payment_method("CancelPayment"): Operation.CANCEL,
    payment_method("Refund"): Operation.REFUND,
}
# Each operation's response builder: the RPC's response for the use case's result.
BUILDERS: dict[Operation, Callable[[Any], Message]] = {
    Operation.CHARGE: charge_response,
    Operation.CAPTURE: capture_response,
    Operation.CANCEL: cancel_response,
    Operation.REFUND: refund_response,
}


def encode_answer(operation: Operation, result: object) -> bytes:
    """The stored answer of a keyed operation for its result (the service's AnswerEncoder)."""
    return BUILDERS[operation](result).SerializeToString(deterministic=True)


def refusal_answer(error: ReportableError) -> StoredAnswer:
    """A business refusal as the key's stored answer: its code and google.rpc.Status."""
    return StoredAnswer(code_for(error).value[0], status_proto_for(error).SerializeToString())
