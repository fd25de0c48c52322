"""The simulator's webhook deliveries: signed like Stripe's, retried until acknowledged.

`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, signed afresh on
every attempt (as Stripe does). A delivery is retried with exponential backoff and jitter
until the endpoint answers 2xx or the attempts run out. With chaos on, some events are
delivered twice and deliveries are delayed at random, so they arrive out of order.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


def signature_header(payload: bytes, secret: str, at: int | None = None) -> str:
    """The PSP side of the signature (the receiver verifies with the Stripe SDK)."""
    timestamp = int(time.time()) if at is None else at
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    first_retry_s: float = 0.5
    max_retry_s: float = 60.0
    max_attempts: int = 20
    timeout_s: float = 10.0
    chaos: bool = False
    chaos_duplicate_rate: float = 0.3
    chaos_max_delay_s: float = 1.0


class WebhookSender:
    def __init__(self, url: str, secret: str, policy: DeliveryPolicy, seed: int | None) -> None:
        self.url = url
        self._secret = secret
        self._policy = policy
        self._rng = random.Random(seed)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0

    def send(self, event: dict[str, Any]) -> None:
        """Deliver in the background; never blocks the API answer that caused it."""
        if not self.url:
            return
        copies = 1
        if self._policy.chaos and self._rng.random() < self._policy.chaos_duplicate_rate:
            copies = 2
        payload = json.dumps(event).encode()
        for _ in range(copies):
            task = asyncio.create_task(self._deliver(payload, str(event["id"])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, payload: bytes, event_id: str) -> None:
        if self._policy.chaos:
            await asyncio.sleep(self._rng.uniform(0, self._policy.chaos_max_delay_s))
        delay = self._policy.first_retry_s
        for attempt in range(1, self._policy.max_attempts + 1):
            if await self._attempt(payload):
                self.delivered += 1
                return
            wait = min(delay, self._policy.max_retry_s) * self._rng.uniform(0.5, 1.5)
            log.info("webhook %s attempt %d failed; retrying in %.2fs", event_id, attempt, wait)
            await asyncio.sleep(wait)
            delay *= 2
        log.error("webhook %s given up after %d attempts", event_id, self._policy.max_attempts)

    async def _attempt(self, payload: bytes) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._policy.timeout_s)
            )
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": signature_header(payload, self._secret),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks) simulator",
        }
        try:
            async with self._session.post(self.url, data=payload, headers=headers) as reply:
                return 200 <= reply.status < 300
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("webhook endpoint unreachable: %s", type(exc).__name__)
            return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
