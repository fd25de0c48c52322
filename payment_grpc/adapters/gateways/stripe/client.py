"""The Stripe gateway (`GATEWAY=stripe`): the PaymentGateway port over the official SDK.

PaymentIntents carry authorizations (manual or automatic capture), captures (partial via
amount_to_capture) and cancels; refunds are Refund objects (several, partial). Every call
sends our gateway idempotency key as `Idempotency-Key`, so a retry after a timeout or a
crash can never move money twice. The SDK's own retries are off: retries belong to the
service (only transient errors, only keyed calls). Exceptions are mapped in errors.py.

Cash on delivery never reaches Stripe: it is authorized and settled here, offline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import stripe

from payment_grpc.adapters.gateways.stripe import transformers
from payment_grpc.adapters.gateways.stripe.errors import CardDeclined, Refused, stripe_edge
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import PaymentMethodType
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationOutcome,
    AuthorizationRequest,
    GatewayResult,
)

log = logging.getLogger(__name__)

OFFLINE_PREFIX = "cod_"


@dataclass(frozen=True, slots=True)
class StripeConfig:
    api_key: str
    api_base: str = "https://api.stripe.com"
    timeout_s: float = 10.0
    connect_timeout_s: float = 3.0


class StripeGateway:
    def __init__(self, config: StripeConfig) -> None:
        self._http = stripe.HTTPXClient(
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            allow_sync_methods=False,
        )
        self._client = stripe.StripeClient(
            config.api_key,
            base_addresses={"api": config.api_base},
            http_client=self._http,
            max_network_retries=0,
        )

    # ---------------------------------------------------------------- authorize

    async def authorize(self, request: AuthorizationRequest) -> Authorization:
        if request.method.type is PaymentMethodType.COD:
            reference = OFFLINE_PREFIX + request.payment_id
            return Authorization(AuthorizationOutcome.AUTHORIZED, reference)
        try:
            with stripe_edge("authorize"):
                intent = await self._client.v1.payment_intents.create_async(
                    params=transformers.intent_params(request),  # type: ignore[arg-type]
                    options={"idempotency_key": request.idempotency_key},
                )
        except CardDeclined as declined:
            return Authorization(
                AuthorizationOutcome.DECLINED, declined.reference, failure=declined.failure
            )
        except Refused as refused:
            return Authorization(AuthorizationOutcome.DECLINED, "", failure=refused.failure)
        return transformers.authorization(intent)

    async def lookup(self, idempotency_key: str) -> Authorization | None:
        """The PaymentIntent created under our key: Stripe has no lookup by key, so the
        intent is found by the payment id in its metadata (and the key beside it)."""
        payment_id = idempotency_key.rsplit(":", 1)[0]
        query = f"metadata['{transformers.PAYMENT_ID_KEY}']:'{payment_id}'"
        with stripe_edge("lookup"):
            found = await self._client.v1.payment_intents.search_async(
                params={"query": query, "expand": ["data.latest_charge"]}
            )
        for intent in found.data:
            metadata = intent.metadata.to_dict()
            if metadata.get("gateway_key", idempotency_key) == idempotency_key:
                return transformers.authorization(intent)
        return None

    async def retrieve(self, reference: str) -> Authorization:
        """The PaymentIntent as Stripe has it now (sync and reconciliation)."""
        with stripe_edge("retrieve"):
            intent = await self._client.v1.payment_intents.retrieve_async(
                reference, params={"expand": ["latest_charge"]}
            )
        return transformers.authorization(intent)

    async def payment_of_intent(self, reference: str) -> str | None:
        """Our payment id, from the PaymentIntent's metadata (disputes name only the intent)."""
        try:
            with stripe_edge("retrieve"):
                intent = await self._client.v1.payment_intents.retrieve_async(reference)
        except Refused:
            return None  # no such intent: not one of ours
        value = intent.metadata.to_dict().get(transformers.PAYMENT_ID_KEY)
        return str(value) if value else None

    async def intent(self, reference: str) -> stripe.PaymentIntent | None:
        try:
            with stripe_edge("retrieve"):
                return await self._client.v1.payment_intents.retrieve_async(reference)
        except Refused:
            return None

    async def intents_between(self, since: datetime, until: datetime) -> list[stripe.PaymentIntent]:
        """PaymentIntents created in [since, until), every page (reconciliation)."""
        found: list[stripe.PaymentIntent] = []
        params: dict[str, Any] = {
            "created": {"gte": int(since.timestamp()), "lt": int(until.timestamp()) + 1},
            "limit": 100,
        }
        while True:
            with stripe_edge("list"):
                page = await self._client.v1.payment_intents.list_async(params=params)  # type: ignore[arg-type]
            found.extend(page.data)
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1].id

    async def refunds_of(self, reference: str) -> dict[str, int]:
        """Succeeded (or pending) refunds of a PaymentIntent: refund id -> amount."""
        with stripe_edge("list"):
            page = await self._client.v1.refunds.list_async(
                params={"payment_intent": reference, "limit": 100}
            )
        return {r.id: r.amount for r in page.data if r.status in ("succeeded", "pending")}

    # ---------------------------------------------------------------- follow-ups

    async def capture(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        if reference.startswith(OFFLINE_PREFIX):
            return GatewayResult(True, reference)
        try:
            with stripe_edge("capture"):
                intent = await self._client.v1.payment_intents.capture_async(
                    reference,
                    params={"amount_to_capture": amount.amount_minor},
                    options={"idempotency_key": idempotency_key},
                )
        except Refused as refused:
            return GatewayResult(False, failure=refused.failure)
        return GatewayResult(intent.status == "succeeded", intent.id)

    async def void(self, reference: str, idempotency_key: str) -> GatewayResult:
        if reference.startswith(OFFLINE_PREFIX):
            return GatewayResult(True, reference)
        try:
            with stripe_edge("void"):
                intent = await self._client.v1.payment_intents.cancel_async(
                    reference, options={"idempotency_key": idempotency_key}
                )
        except Refused as refused:
            return GatewayResult(False, failure=refused.failure)
        return GatewayResult(intent.status == "canceled", intent.id)

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        if reference.startswith(OFFLINE_PREFIX):
            return GatewayResult(True, f"{OFFLINE_PREFIX}refund_{idempotency_key}")
        try:
            with stripe_edge("refund"):
                refund = await self._client.v1.refunds.create_async(
                    params={"payment_intent": reference, "amount": amount.amount_minor},
                    options={"idempotency_key": idempotency_key},
                )
        except Refused as refused:
            return GatewayResult(False, failure=refused.failure)
        return GatewayResult(refund.status in ("succeeded", "pending"), refund.id)

    # ---------------------------------------------------------------- lifecycle

    def available(self) -> bool:
        return True  # no breaker of its own (GuardedGateway adds one)

    async def healthy(self) -> bool:
        with stripe_edge("health"):
            await self._client.v1.payment_intents.list_async(params={"limit": 1})
        return True

    async def start(self) -> None:
        """Nothing to start: the HTTP client connects on first use."""

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]
