"""Charge: create the payment, ask the gateway, record the outcome.

Phases (each one transaction): 1. insert PENDING -> PROCESSING (and claim the idempotency
key, unless the transport or an order check claimed it before); 2. authorize at the
gateway with a key derived from the payment id (the gateway dedupes on it); 3. record
the outcome (service/settlements.py: the same use case takes the gateway's own news).
A crash or timeout between 1 and 3 leaves the payment PROCESSING and the recovery
worker (or a retry) finishes it with the same gateway key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import (
    CaptureMethod,
    Payment,
    PaymentMethod,
    PaymentMethodType,
    PaymentStatus,
)
from payment_grpc.service.changes import Change, Changes
from payment_grpc.service.context import RequestContext
from payment_grpc.service.deps import Deps, authorize_key, new_id
from payment_grpc.service.idempotency import Checkpoint, no_checkpoint
from payment_grpc.service.orders import check_order
from payment_grpc.service.ports import (
    NO_ANSWER,
    AuthorizationRequest,
    GatewayCircuitOpen,
    OrderDirectory,
    RecoveryPoint,
)
from payment_grpc.service.settlements import Settlements

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChargeCommand:
    order_id: str
    amount: Money
    method: PaymentMethod
    capture_method: CaptureMethod = CaptureMethod.AUTOMATIC
    customer_id: str = ""
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


class Charging:
    def __init__(
        self, deps: Deps, settlements: Settlements, orders: OrderDirectory | None = None
    ) -> None:
        """`orders`: when set, every new charge must match a payable order there."""
        self._deps = deps
        self._settlements = settlements
        self._changes = Changes(deps.uow, deps.faults)
        self._orders = orders

    async def charge(
        self, command: ChargeCommand, ctx: RequestContext, checkpoint: Checkpoint | None = None
    ) -> Payment:
        checkpoint = checkpoint or no_checkpoint()
        if self._orders is not None:
            # The order service is asked once per execution of the key, never for a
            # replay: the key is claimed before, in a transaction of its own.
            await checkpoint.claim()
        if checkpoint.payment_id:
            return await self._resume(checkpoint.payment_id, ctx, checkpoint)
        if not self._deps.gateway.available():
            # The breaker is open: answer at once, before a payment exists (nothing stored).
            raise GatewayCircuitOpen("the payment gateway is unavailable; retry later")
        if self._orders is not None:  # before anything is persisted
            customers = (command.customer_id, ctx.customer_id or "")
            await check_order(self._orders, command.order_id, command.amount, customers)
        payment = await self.create(command, ctx, checkpoint)
        self._deps.faults.hit("charge.before_gateway")
        return await self.authorize(payment, ctx, checkpoint)

    async def _resume(
        self, payment_id: str, ctx: RequestContext, checkpoint: Checkpoint
    ) -> Payment:
        """A retry after a crash: the payment exists; finish what is left."""
        async with self._deps.uow(read_only=True) as tx:
            payment = await tx.payments.get(payment_id)
        if payment.status is PaymentStatus.PROCESSING:
            return await self.authorize(payment, ctx, checkpoint)
        await self._changes.finish(checkpoint, payment)
        return payment

    async def create(
        self, command: ChargeCommand, ctx: RequestContext, checkpoint: Checkpoint
    ) -> Payment:
        now = self._deps.clock.now()
        pending = Payment(
            payment_id=new_id("pay"),
            order_id=command.order_id,
            customer_id=command.customer_id,
            amount=command.amount,
            capture_method=command.capture_method,
            method=command.method,
            created_at=now,
            updated_at=now,
            description=command.description,
            metadata=dict(command.metadata),
        )
        created = pending.creation_event(ctx.subject, ctx.trace_id)
        processing, sent = pending.transition(
            PaymentStatus.PROCESSING,
            action="charge",
            actor=ctx.subject,
            trace_id=ctx.trace_id,
            at=now,
        )
        claim = checkpoint.claiming(RecoveryPoint.PAYMENT_CREATED, payment_id=processing.payment_id)
        async with self._deps.uow() as tx:
            # First: a Charge whose key is not claimed yet claims it here, so a concurrent
            # one with the key waits at its claim before it wrote anything of its own.
            await claim(tx)
            await self._changes.commit(tx, Change(processing, events=[created, sent]))
        return processing

    async def authorize(
        self, payment: Payment, ctx: RequestContext, checkpoint: Checkpoint | None = None
    ) -> Payment:
        """Phase 2+3; safe to repeat for the same payment (the gateway dedupes)."""
        request = AuthorizationRequest(
            idempotency_key=authorize_key(payment.payment_id),
            payment_id=payment.payment_id,
            amount=payment.amount,
            method=payment.method,
            capture=_captures_now(payment),
        )
        try:
            authorization = await self._deps.gateway.authorize(request)
        except NO_ANSWER as exc:
            log.warning("gateway did not answer for %s: %s", payment.payment_id, type(exc).__name__)
            return payment  # stays PROCESSING; the key stays open for a retry to resume
        self._deps.faults.hit("charge.after_gateway")
        return await self._settlements.record(
            payment.payment_id, authorization, ctx, checkpoint, known=payment
        )


def _captures_now(payment: Payment) -> bool:
    return (
        payment.capture_method is CaptureMethod.AUTOMATIC
        and payment.method.type is not PaymentMethodType.COD
    )
