"""Authentication and scopes for PaymentService; health and reflection stay open.

`authorization: Bearer <JWT>` is verified by the configured TokenVerifier; the principal
becomes the call's RequestContext (subject, scopes, customer id), which the use cases,
the idempotency scope and the audit trail use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from payment_grpc.api.context import current_request, remember_deadline
from payment_grpc.api.errors import status_for
from payment_grpc.api.interceptors.guard import abort_with
from payment_grpc.api.interceptors.wrapping import (
    ServerInterceptor,
    Streaming,
    Unary,
    wrap_handler,
)
from payment_grpc.domain.errors import ReportableError
from payment_grpc.service.errors import PermissionDenied, Unauthenticated
from payment_grpc.service.ports import Principal, TokenVerifier

ADMIN = "payments.admin"
SERVICE = "/payments.v1.PaymentService/"
OUR_SERVICES = "/payments.v1."  # PaymentService and AdminService (anything else: open)
REQUIRED_SCOPE = {
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
    required = REQUIRED_SCOPE.get(method.removeprefix(SERVICE), ADMIN)
    if required not in principal.scopes and ADMIN not in principal.scopes:
        raise PermissionDenied(required)


class AuthInterceptor(ServerInterceptor):
    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(OUR_SERVICES):
            return handler
        method, metadata = details.method, details.invocation_metadata

        async def authenticate(context: aio.ServicerContext[Any, Any]) -> None:
            remember_deadline(context)  # the auth service is the first collaborator asked
            try:
                principal = await self._verifier.verify(bearer_token(metadata))
                authorize(principal, method)
            except ReportableError as error:
                await abort_with(context, status_for(error))
            current_request.set(
                dataclasses.replace(
                    current_request.get(),
                    subject=principal.subject,
                    scopes=principal.scopes,
                    customer_id=principal.customer_id,
                )
            )

        def unary(behavior: Unary) -> Unary:
            async def authenticated(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                await authenticate(context)
                return await behavior(request, context)

            return authenticated

        def streaming(behavior: Streaming) -> Streaming:
            async def authenticated(
                request: Any, context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await authenticate(context)
                async for item in behavior(request, context):
                    yield item

            return authenticated

        return wrap_handler(handler, unary, streaming)
