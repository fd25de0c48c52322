"""A fake order service that is a real grpc.aio server on 127.0.0.1 port 0 (orders.v1)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from orders.v1 import order_service_pb2 as orders
from orders.v1 import order_service_pb2_grpc


@dataclass
class FakeOrderService(order_service_pb2_grpc.OrderServiceServicer):
    orders: dict[str, orders.Order] = field(default_factory=dict)
    down: bool = False  # answer UNAVAILABLE to everything
    hanging: bool = False  # answer nothing until released (or the caller gives up)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    get_calls: int = 0
    deadlines_seen: list[float | None] = field(default_factory=list)
    notifications: list[orders.NotifyPaymentOutcomeRequest] = field(default_factory=list)
    notified: asyncio.Condition = field(default_factory=asyncio.Condition)
    notifications_down: bool = False  # refuse NotifyPaymentOutcome only (GetOrder answers)
    notifications_hanging: bool = False  # hold NotifyPaymentOutcome until released
    refused_notifications: int = 0
    hung_notifications: int = 0
    hung: list[tuple[str, int]] = field(default_factory=list)  # (payment id, sequence) held
    # (method, the call's `traceparent` metadata or "") of every call, in arrival order
    traceparents: list[tuple[str, str]] = field(default_factory=list)

    def add(self, order_id: str, total_minor: int = 10_000, **fields: Any) -> orders.Order:
        fields.setdefault("currency", "USD")
        fields.setdefault("payable", True)
        fields.setdefault("customer_id", "")
        order = orders.Order(order_id=order_id, total_minor=total_minor, **fields)
        self.orders[order_id] = order
        return order

    async def _gate(self, context: aio.ServicerContext[Any, Any], method: str) -> None:
        self.deadlines_seen.append(context.time_remaining())
        metadata = dict(context.invocation_metadata() or ())
        self.traceparents.append((method, str(metadata.get("traceparent", ""))))
        if self.hanging:
            await self.released.wait()
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "order service down")

    async def GetOrder(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self.get_calls += 1
        await self._gate(context, "GetOrder")
        order = self.orders.get(request.order_id)
        if order is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such order")
        return orders.GetOrderResponse(order=order)

    async def NotifyPaymentOutcome(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        await self._gate(context, "NotifyPaymentOutcome")
        if self.notifications_hanging:
            async with self.notified:
                self.hung_notifications += 1
                self.hung.append((request.payment_id, request.sequence))
                self.notified.notify_all()
            await self.released.wait()
        if self.notifications_down:
            async with self.notified:
                self.refused_notifications += 1
                self.notified.notify_all()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "notifications down")
        async with self.notified:
            self.notifications.append(request)
            self.notified.notify_all()
        return orders.NotifyPaymentOutcomeResponse()

    async def wait_for_notifications(self, count: int) -> None:
        await self.wait_until(lambda: len(self.notifications) >= count)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async with self.notified:
            await self.notified.wait_for(condition)

    def delivered(self) -> list[tuple[str, int]]:
        """(payment id, sequence) of every notification, in arrival order."""
        return [(n.payment_id, n.sequence) for n in self.notifications]


@contextlib.asynccontextmanager
async def order_service() -> AsyncIterator[tuple[FakeOrderService, int]]:
    fake = FakeOrderService()
    server = aio.server()
    order_service_pb2_grpc.add_OrderServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake, port
    finally:
        fake.released.set()
        await server.stop(None)
