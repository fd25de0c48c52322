"""The gateway's side of reconciliation: the simulator's ledger, or Stripe's list APIs."""

from __future__ import annotations

from datetime import datetime

import stripe

from payment_grpc.adapters.gateways.engine import ChargeView, SimulatorEngine
from payment_grpc.adapters.gateways.stripe.client import OFFLINE_PREFIX, StripeGateway
from payment_grpc.service.ports import AuthorizationOutcome
from payment_grpc.service.reconciliation import ChargeRecord, GatewayState

STRIPE_STATES = {
    "requires_capture": GatewayState.AUTHORIZED,
    "succeeded": GatewayState.CAPTURED,
    "canceled": GatewayState.CANCELED,
    "requires_payment_method": GatewayState.FAILED,
}


class LedgerChargeSource:
    """The simulator engine's ledger (the in-process gateway's, or gateway-sim's file)."""

    def __init__(self, engine: SimulatorEngine) -> None:
        self._engine = engine

    async def between(self, since: datetime, until: datetime) -> list[ChargeRecord]:
        return [_from_view(view) for view in await self._engine.charges_between(since, until)]

    async def by_reference(self, reference: str) -> ChargeRecord | None:
        view = await self._engine.charge(reference)
        return None if view is None else _from_view(view)

    def tracks(self, reference: str) -> bool:
        return True


def _from_view(view: ChargeView) -> ChargeRecord:
    outcome = view.authorization.outcome
    if view.voided:
        state = GatewayState.CANCELED
    elif outcome is AuthorizationOutcome.PENDING:
        state = GatewayState.PENDING
    elif outcome is AuthorizationOutcome.DECLINED:
        state = GatewayState.FAILED
    elif view.captured_minor == 0:
        state = GatewayState.AUTHORIZED
    else:
        state = GatewayState.CAPTURED
    return ChargeRecord(
        payment_id=view.payment_id,
        reference=view.reference,
        currency=view.amount.currency,
        amount_minor=view.amount.amount_minor,
        captured_minor=view.captured_minor,
        refunded_minor=view.refunded_minor,
        state=state,
        refunds={r.reference: r.amount_minor for r in view.refunds},
    )


class StripeChargeSource:
    """PaymentIntents (and their refunds) through Stripe's list APIs."""

    def __init__(self, gateway: StripeGateway) -> None:
        self._gateway = gateway

    async def between(self, since: datetime, until: datetime) -> list[ChargeRecord]:
        return [
            await self._record(intent)
            for intent in await self._gateway.intents_between(since, until)
        ]

    async def by_reference(self, reference: str) -> ChargeRecord | None:
        intent = await self._gateway.intent(reference)
        return None if intent is None else await self._record(intent)

    def tracks(self, reference: str) -> bool:
        return not reference.startswith(OFFLINE_PREFIX)

    async def _record(self, intent: stripe.PaymentIntent) -> ChargeRecord:
        refunds = await self._gateway.refunds_of(intent.id)
        metadata = intent.metadata.to_dict()
        status = str(intent.status)
        return ChargeRecord(
            payment_id=str(metadata.get("payment_id", "")),
            reference=str(intent.id),
            currency=str(intent.currency).upper(),
            amount_minor=int(intent.amount),
            captured_minor=int(intent.amount_received or 0),
            refunded_minor=sum(refunds.values()),
            state=STRIPE_STATES.get(status, GatewayState.PENDING),
            refunds=refunds,
        )
