"""The order service (protos/orders/v1): the OrderDirectory port (GetOrder on Charge) and
the outcome notifications the outbox relay delivers (NotifyPaymentOutcome).

Every call goes through the shared resilience piece (deadline, retries of UNAVAILABLE and
DEADLINE_EXCEEDED with backoff and jitter, the order service's circuit breaker). gRPC
errors are mapped here, once: NOT_FOUND is "no such order"; anything else that is not an
answer becomes OrderServiceUnavailable.
"""

from __future__ import annotations

import grpc
from grpc import aio
from orders.v1 import order_service_pb2, order_service_pb2_grpc
from payments.v1 import events_pb2

from payment_grpc.adapters.resilience import (
    CallPolicy,
    CircuitOpen,
    Collaborator,
    DeadlinePassed,
)
from payment_grpc.service.errors import OrderServiceUnavailable
from payment_grpc.service.outbox import OUTCOME_TYPES
from payment_grpc.service.ports import Order, OutboxMessage, SinkUnavailable
from payment_grpc.telemetry.tracing import continued


class OrderServiceClient:
    def __init__(self, channel: aio.Channel, policy: CallPolicy) -> None:
        self._channel = channel
        self._stub = order_service_pb2_grpc.OrderServiceStub(channel)
        self._service = Collaborator("order-service", policy)

    async def get_order(self, order_id: str) -> Order | None:
        request = order_service_pb2.GetOrderRequest(order_id=order_id)
        try:
            reply = await self._service.call(
                lambda timeout: self._stub.GetOrder(request, timeout=timeout)
            )
        except aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise OrderServiceUnavailable() from exc
        except (CircuitOpen, DeadlinePassed) as exc:
            raise OrderServiceUnavailable() from exc
        order = reply.order
        return Order(
            order_id=order.order_id or order_id,
            customer_id=order.customer_id,
            currency=order.currency,
            total_minor=order.total_minor,
            payable=order.payable,
        )

    async def notify_outcome(self, request: order_service_pb2.NotifyPaymentOutcomeRequest) -> None:
        """Raises OrderServiceUnavailable when the notification was not acknowledged."""
        try:
            await self._service.call(
                lambda timeout: self._stub.NotifyPaymentOutcome(request, timeout=timeout)
            )
        except (aio.AioRpcError, CircuitOpen, DeadlinePassed) as exc:
            raise OrderServiceUnavailable() from exc

    async def close(self) -> None:
        await self._channel.close(None)


class OrderNotificationSink:
    """Every payment outcome, to the order service (NotifyPaymentOutcome), via the outbox."""

    name = "orders"

    def __init__(self, client: OrderServiceClient) -> None:
        self._client = client

    def wants(self, event_type: str) -> bool:
        return event_type in OUTCOME_TYPES

    async def start(self) -> None:
        return None

    async def deliver(self, message: OutboxMessage) -> None:
        event = events_pb2.PaymentEvent.FromString(message.payload)
        request = order_service_pb2.NotifyPaymentOutcomeRequest(
            order_id=event.payment.order_id,
            payment_id=event.payment.payment_id,
            status=event.payment.status,
            sequence=event.sequence,
        )
        try:
            # In the trace of the call that made the change: the traced channel's client
            # span joins it and the call's metadata carries its traceparent.
            with continued(event.trace.traceparent):
                await self._client.notify_outcome(request)
        except OrderServiceUnavailable as exc:
            raise SinkUnavailable("the order service did not acknowledge") from exc

    async def close(self) -> None:
        return None  # the client is closed by its owner
