"""Stripe's webhooks in: `POST /v1/webhooks/stripe` on a small HTTP listener (aiohttp).

The signature covers the exact bytes Stripe sent, so the body is read raw and verified
with the SDK's own verifier (`stripe.Webhook.construct_event`, 300 s tolerance). A bad
signature, a stale timestamp or a tampered body is answered 400 and changes nothing. A
verified event becomes a GatewayNotice for the GatewayNews use case; 200 acknowledges it,
500 (our database down) makes Stripe retry later.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import stripe
from aiohttp import web

from payment_grpc.adapters.gateways.stripe import transformers
from payment_grpc.service.ports import GatewayNotice, NoticeKind

log = logging.getLogger(__name__)

PATH = "/v1/webhooks/stripe"
TOLERANCE_S = 300
Inbox = Callable[[GatewayNotice], Awaitable[str]]
PaymentOfIntent = Callable[[str], Awaitable[str | None]]


class StripeWebhookListener:
    def __init__(
        self,
        secret: str,
        inbox: Inbox,
        payment_of_intent: PaymentOfIntent,
        tolerance_s: int = TOLERANCE_S,
    ) -> None:
        self._secret = secret
        self._inbox = inbox
        self._payment_of_intent = payment_of_intent
        self._tolerance_s = tolerance_s
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """`reuse_port`: sibling worker processes (WORKERS > 1) share the port, as they
        share the gRPC port."""
        app = web.Application(client_max_size=512 * 1024)
        app.router.add_post(PATH, self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None).start()
        self.port = int(self._runner.addresses[0][1])
        log.info("stripe webhooks listening", extra={"port": self.port, "path": PATH})
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.read()
        signature = request.headers.get("Stripe-Signature", "")
        try:
            event = stripe.Webhook.construct_event(
                payload, signature, self._secret, tolerance=self._tolerance_s
            )
        except (stripe.SignatureVerificationError, ValueError) as exc:
            log.warning("stripe webhook refused: %s", type(exc).__name__)
            return web.json_response({"error": "invalid signature or payload"}, status=400)
        try:
            notice = await self._notice(event)
            outcome = await self._inbox(notice)
        except Exception:
            log.exception("stripe webhook %s not processed; Stripe will retry", event.id)
            return web.json_response({"error": "not processed, retry later"}, status=500)
        log.info("stripe webhook %s (%s): %s", event.id, event.type, outcome)
        return web.json_response({"received": True, "outcome": outcome})

    async def _notice(self, event: stripe.Event) -> GatewayNotice:
        obj: Any = event.data.object
        if event.type.startswith("payment_intent."):
            return GatewayNotice(
                event_id=event.id,
                event_type=event.type,
                kind=NoticeKind.AUTHORIZATION,
                payment_id=_payment_id(obj),
                authorization=transformers.authorization(obj),
            )
        if event.type == "charge.dispute.created":
            intent_id = getattr(obj, "payment_intent", None)
            payment_id = await self._payment_of_intent(str(intent_id)) if intent_id else None
            return GatewayNotice(
                event_id=event.id,
                event_type=event.type,
                kind=NoticeKind.DISPUTE_OPENED,
                payment_id=payment_id,
                detail=f"{obj.id} {getattr(obj, 'reason', '')} {getattr(obj, 'amount', '')}",
            )
        return GatewayNotice(event.id, event.type, NoticeKind.OTHER, _payment_id(obj))


def _payment_id(obj: Any) -> str | None:
    metadata = getattr(obj, "metadata", None)
    if metadata is None:
        return None
    value = metadata.to_dict().get(transformers.PAYMENT_ID_KEY)
    return str(value) if value else None
