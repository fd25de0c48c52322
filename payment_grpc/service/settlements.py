"""Record a gateway's answer to an authorization: the one use case behind the inbound
port (GatewayNews). Charge calls it with the answer of its own call; an adapter calls it
when the gateway reports an outcome on its own (an asynchronous method settled, later a
webhook); the recovery worker calls it with what a lookup found."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from payment_grpc.domain.payment import Payment, PaymentEvent, PaymentStatus
from payment_grpc.service.changes import (
    NO_CHANGE,
    Change,
    Changes,
    Decision,
    Snapshot,
    payment_reader,
)
from payment_grpc.service.context import GATEWAY_CALLBACK, RequestContext
from payment_grpc.service.deps import Records
from payment_grpc.service.idempotency import Checkpoint, no_checkpoint
from payment_grpc.service.ports import Authorization, AuthorizationOutcome, Settlement


class Settlements:
    """Implements GatewayNews."""

    def __init__(self, records: Records) -> None:
        self._clock = records.clock
        self._changes = Changes(records.uow, records.faults)

    async def settled(self, settlement: Settlement) -> None:
        await self.record(settlement.payment_id, settlement.authorization, GATEWAY_CALLBACK)

    async def record(
        self,
        payment_id: str,
        authorization: Authorization,
        ctx: RequestContext,
        checkpoint: Checkpoint | None = None,
        known: Payment | None = None,
    ) -> Payment:
        """Apply the gateway's answer, once. A second answer changes nothing. `known` is
        the payment as the caller last saw it (it is read when not given)."""
        now = self._clock.now()

        def decide(snapshot: Snapshot) -> Decision[Payment]:
            current = snapshot.payment
            if current.status is not PaymentStatus.PROCESSING:
                return Decision(NO_CHANGE, current)  # recorded already: answer what it is
            after, events = _apply(current, authorization, ctx, now)
            return Decision(Change(after, current, events), after)

        return await self._changes.decide(
            payment_reader(payment_id),
            Snapshot(known) if known else None,
            decide,
            checkpoint or no_checkpoint(),
            fault="charge.after_commit",
        )


_OUTCOME_STATUS = {
    AuthorizationOutcome.AUTHORIZED: PaymentStatus.AUTHORIZED,
    AuthorizationOutcome.CAPTURED: PaymentStatus.CAPTURED,
    AuthorizationOutcome.DECLINED: PaymentStatus.FAILED,
}


def _apply(
    current: Payment, authorization: Authorization, ctx: RequestContext, now: datetime
) -> tuple[Payment, list[PaymentEvent]]:
    if authorization.outcome is AuthorizationOutcome.PENDING:
        return replace(current, gateway_reference=authorization.reference), []
    to = _OUTCOME_STATUS[authorization.outcome]
    captured = current.amount.amount_minor if to is PaymentStatus.CAPTURED else 0
    after, event = current.transition(
        to,
        action="authorize",
        actor=ctx.subject,
        trace_id=ctx.trace_id,
        at=now,
        gateway_reference=authorization.reference,
        card=authorization.card or current.card,
        failure=authorization.failure,
        captured_minor=captured,
    )
    return after, [event]
