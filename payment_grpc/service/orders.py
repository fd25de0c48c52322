"""The order check on Charge: the charge must match a payable order of the order service.

Runs before anything is persisted. A definite answer (unknown, not payable, mismatch) is a
domain error the idempotency layer stores as the key's answer; OrderServiceUnavailable is
retryable and not stored.
"""

from __future__ import annotations

from collections.abc import Iterable

from payment_grpc.domain.errors import OrderMismatch, OrderNotFound, OrderNotPayable
from payment_grpc.domain.money import Money
from payment_grpc.service.ports import Order, OrderDirectory


async def check_order(
    orders: OrderDirectory, order_id: str, amount: Money, customer_ids: Iterable[str]
) -> Order:
    """`customer_ids`: who the charge says pays (the request's and the caller token's)."""
    order = await orders.get_order(order_id)
    if order is None:
        raise OrderNotFound(order_id)
    if not order.payable:
        raise OrderNotPayable(order_id)
    if order.currency != amount.currency or order.total_minor != amount.amount_minor:
        raise OrderMismatch(
            order_id,
            "amount",
            expectedCurrency=order.currency,
            expectedAmountMinor=str(order.total_minor),
        )
    if any(who and who != order.customer_id for who in customer_ids):
        raise OrderMismatch(order_id, "customer_id", expectedCustomerId=order.customer_id)
    return order
