"""Inbound news from the gateway (verified webhooks): the same `record` use case as a
synchronous answer (Settlements.record), applied once per event id.

- An authorization update finishes a payment still PROCESSING; a payment past PROCESSING is
  never moved by it (a late `processing` after `succeeded`, a `succeeded` after a refund:
  nothing changes). `Settlements.record` is that rule.
- A dispute is written on the payment as an event without a status change (audit trail +
  watchers), in the same transaction as the event id; no money moves.
- An event naming no payment of ours is acknowledged and logged.
The event id is stored after its change commits (or with it, for disputes): a crash in
between redelivers the event, and applying an authorization twice changes nothing.
"""

from __future__ import annotations

import logging

from payment_grpc.domain.errors import PaymentNotFound
from payment_grpc.service.context import GATEWAY_CALLBACK
from payment_grpc.service.deps import Records
from payment_grpc.service.ports import GatewayNotice, NoticeKind, UnitOfWork
from payment_grpc.service.settlements import Settlements

log = logging.getLogger(__name__)


class GatewayEvents:
    def __init__(self, records: Records, settlements: Settlements) -> None:
        self._deps = records
        self._settlements = settlements

    async def receive(self, notice: GatewayNotice) -> str:
        """Apply the notice once; returns what happened (for the log and the reply)."""
        async with self._deps.uow(read_only=True) as tx:
            if await tx.gateway_events.seen(notice.event_id):
                return "duplicate"
            known = notice.payment_id is not None and await _exists(tx, notice.payment_id)
        if not known:
            log.warning(
                "gateway event %s (%s) names no payment of ours: acknowledged",
                notice.event_id,
                notice.event_type,
            )
            return await self._remember(notice, "unknown payment")
        if notice.kind is NoticeKind.DISPUTE_OPENED:
            return await self._dispute(notice)
        if notice.kind is NoticeKind.AUTHORIZATION and notice.authorization is not None:
            assert notice.payment_id is not None
            await self._settlements.record(
                notice.payment_id, notice.authorization, GATEWAY_CALLBACK
            )
        return await self._remember(notice, "applied")

    async def _remember(self, notice: GatewayNotice, outcome: str) -> str:
        async with self._deps.uow() as tx:
            added = await tx.gateway_events.add(notice, self._deps.clock.now())
            await tx.commit()
        return outcome if added else "duplicate"

    async def _dispute(self, notice: GatewayNotice) -> str:
        assert notice.payment_id is not None
        async with self._deps.uow() as tx:
            if not await tx.gateway_events.add(notice, self._deps.clock.now()):
                return "duplicate"
            payment = await tx.payments.get(notice.payment_id, for_update=True)
            noted, event = payment.noted(
                actor=f"gateway:{notice.event_type}:{notice.detail}"[:255],
                trace_id="",
                at=self._deps.clock.now(),
            )
            await tx.payments.save(payment, noted, [event])
            await tx.commit()
        log.warning("dispute opened on %s: %s", notice.payment_id, notice.detail)
        return "dispute recorded"


async def _exists(tx: UnitOfWork, payment_id: str) -> bool:
    try:
        await tx.payments.get(payment_id)
    except PaymentNotFound:
        return False
    return True
