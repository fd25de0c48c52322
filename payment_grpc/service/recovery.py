"""Finishes work a crash or a gateway timeout left half done.

Runs periodically in every replica. Safe to run twice at once: each item is finished
by a gateway call with the same derived key (the gateway dedupes) and recorded under
the row lock only if it is still unfinished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import timedelta

from payment_grpc.domain.errors import DomainError
from payment_grpc.domain.payment import Payment, PaymentStatus
from payment_grpc.domain.refund import Refund
from payment_grpc.service.charging import Charging
from payment_grpc.service.context import SYSTEM
from payment_grpc.service.deps import Deps, authorize_key
from payment_grpc.service.idempotency import IdempotencyKeys
from payment_grpc.service.operations import CANCEL, Operations
from payment_grpc.service.ports import AuthorizationOutcome, GatewayDown, GatewayTimeout

log = logging.getLogger(__name__)
BATCH = 100


class Recovery:
    def __init__(
        self,
        deps: Deps,
        charging: Charging,
        operations: Operations,
        keys: IdempotencyKeys,
        stale_after: timedelta,
    ) -> None:
        self._deps = deps
        self._charging = charging
        self._operations = operations
        self._keys = keys
        self._stale_after = stale_after

    async def run_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("recovery pass failed; trying again next interval")
            await asyncio.sleep(interval_s)

    async def run_once(self) -> int:
        """One pass; returns how many items it finished."""
        cutoff = self._deps.clock.now() - self._stale_after
        async with self._deps.uow(read_only=True) as tx:
            payments = await tx.payments.stale(cutoff, BATCH)
            refunds = await tx.refunds.stale_pending(cutoff, BATCH)
        done = 0
        for payment in payments:
            done += await self._guard(self._payment(payment))
        for refund in refunds:
            done += await self._guard(self._refund(refund))
        await self._keys.reap()
        return done

    async def _guard(self, work: Awaitable[None]) -> int:
        try:
            await work
        except (GatewayTimeout, GatewayDown, DomainError) as exc:
            log.info("recovery item not finished yet: %s", exc)
            return 0
        return 1

    async def _payment(self, payment: Payment) -> None:
        if payment.in_flight == CANCEL:
            await self._operations.finish_cancel(payment, SYSTEM)
        elif payment.in_flight:
            await self._operations.finish_capture(payment, SYSTEM)
        elif payment.status is PaymentStatus.PROCESSING:
            await self._settle_processing(payment)

    async def _settle_processing(self, payment: Payment) -> None:
        known = await self._deps.gateway.lookup(authorize_key(payment.payment_id))
        if known is None:
            await self._charging.authorize(payment, SYSTEM)  # never reached the gateway
        elif known.outcome is not AuthorizationOutcome.PENDING:
            await self._charging.record(payment.payment_id, known, SYSTEM)

    async def _refund(self, refund: Refund) -> None:
        await self._operations.finish_refund(refund, SYSTEM)
