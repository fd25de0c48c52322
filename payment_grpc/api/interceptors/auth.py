"""Authentication and scopes for PaymentService; health and reflection stay open.

`authorization: Bearer <JWT>` is verified by the configured TokenVerifier; the principal
becomes the call's RequestContext (subject, scopes, customer id), which the use cases,
the idempotency scope and the audit trail use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from grpc import aio

from payment_grpc.api.context import current_request
from payment_grpc.api.interceptors.wrapping import CheckFirst
from payment_grpc.api.methods import payment_method
from payment_grpc.service.errors import PermissionDenied, Unauthenticated
from payment_grpc.service.ports import Principal, TokenVerifier

ADMIN = "payments.admin"
# Methods of our services not listed (AdminService's): ADMIN.
REQUIRED_SCOPE = {
    payment_method(name): scope
    for name, scope in {
        "Charge": "payments.charge",
        "CapturePayment": "payments.charge",
        "CancelPayment": "payments.charge",
        "Refund": "payments.refund",
        "GetPayment": "payments.read",
        "ListPayments": "payments.read",
        "GetRefund": "payments.read",
        "ListRefunds": "payments.read",
        "WatchPaymentStatus": "payments.read",
        "WatchPayments": "payments.read",
    }.items()
}


def bearer_token(metadata: tuple[Any, ...] | None) -> str:
    values = [v for k, v in metadata or () if k == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        raise Unauthenticated()
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated()
    return token.strip()


def authorize(principal: Principal, method: str) -> None:
    required = REQUIRED_SCOPE.get(method, ADMIN)
    if required not in principal.scopes and ADMIN not in principal.scopes:
        raise PermissionDenied(required)


class AuthInterceptor(CheckFirst):
    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def check(
        self, details: grpc.HandlerCallDetails, context: aio.ServicerContext[Any, Any]
    ) -> None:
        principal = await self._verifier.verify(bearer_token(details.invocation_metadata))
        authorize(principal, details.method)
        current_request.set(
            dataclasses.replace(
                current_request.get(),
                subject=principal.subject,
                scopes=principal.scopes,
                customer_id=principal.customer_id,
            )
        )
