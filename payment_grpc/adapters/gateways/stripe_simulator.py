"""`payment-grpc gateway-sim`: a Stripe-compatible HTTP face over the simulator engine.

Speaks the subset of Stripe's REST API our Stripe adapter uses, well enough for the
official SDK: form-encoded bodies, `Authorization: Bearer <test key>`, Stripe's object
shapes and error envelope, and Stripe's `Idempotency-Key` semantics (same key + same
parameters -> the same stored answer, marked `Idempotent-Replayed: true`; other parameters
-> 400 idempotency_error; the same key still executing -> 409). The decisions and the
ledger are the engine's, shared with the in-process simulated gateway.

Test hooks (not Stripe's; under /_sim): POST /_sim/faults queues faults for the next API
requests (rate_limit, server_error, permission_denied, disconnect_after, slow:MS;
`clear=1` first drops those still queued); POST /_sim/disputes opens a dispute on a
PaymentIntent (a `charge.dispute.created` webhook, no money moves).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from payment_grpc.adapters.gateways import stripe_objects as objects
from payment_grpc.adapters.gateways.engine import ChargeView, SimulatorEngine
from payment_grpc.adapters.gateways.stripe_objects import IntentParams
from payment_grpc.adapters.gateways.stripe_webhooks_out import WebhookSender
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import PaymentMethod, PaymentMethodType
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationOutcome,
    AuthorizationRequest,
    GatewayResult,
    GatewayTimeout,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STRIPE_BODY = web.ResponseKey("stripe_body", dict)
IDEMPOTENCY_MEMORY = 100_000  # stored answers kept (Stripe keeps them 24 h)
METHOD_TYPES = {
    "card": PaymentMethodType.CARD,
    "upi": PaymentMethodType.UPI,
    "netbanking": PaymentMethodType.NET_BANKING,
    "paypal": PaymentMethodType.PAYPAL,
}
SEARCH_BY_PAYMENT = re.compile(r"^metadata\['payment_id'\]:'([^']+)'$")
REFUSAL_CODES = {"charge_not_authorized": "payment_intent_unexpected_state"}


class StripeProblem(Exception):
    """An answer in Stripe's error envelope."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body["error"].get("message", ""))
        self.status = status
        self.body = body


def invalid(message: str, code: str | None = None, param: str | None = None) -> StripeProblem:
    extra = {"param": param} if param else {}
    return StripeProblem(400, objects.envelope("invalid_request_error", message, code, **extra))


def missing(kind: str, object_id: str) -> StripeProblem:
    return StripeProblem(
        404,
        objects.envelope(
            "invalid_request_error", f"No such {kind}: '{object_id}'", "resource_missing"
        ),
    )


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    fingerprint: str
    status: int
    body: dict[str, Any]


class Idempotency:
    """Stripe's idempotent requests: answers by (API key, Idempotency-Key)."""

    def __init__(self) -> None:
        self._answers: OrderedDict[tuple[str, str], StoredAnswer] = OrderedDict()
        self._running: set[tuple[str, str]] = set()

    def lookup(self, scope: tuple[str, str], fingerprint: str) -> StoredAnswer | None:
        stored = self._answers.get(scope)
        if stored is None:
            if scope in self._running:
                raise StripeProblem(
                    409,
                    objects.envelope(
                        "idempotency_error",
                        "There is currently another in-progress request using this"
                        " Idempotent Key. Please try again later.",
                        "idempotency_key_in_use",
                    ),
                )
            return None
        if stored.fingerprint != fingerprint:
            raise StripeProblem(
                400,
                objects.envelope(
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters"
                    " they were first used with.",
                ),
            )
        return stored

    def begin(self, scope: tuple[str, str]) -> None:
        self._running.add(scope)

    def end(self, scope: tuple[str, str], answer: StoredAnswer | None) -> None:
        self._running.discard(scope)
        if answer is not None:
            self._answers[scope] = answer
            while len(self._answers) > IDEMPOTENCY_MEMORY:
                self._answers.popitem(last=False)


class Faults:
    """Faults queued by tests for the next API requests, first in first out."""

    def __init__(self) -> None:
        self._queue: deque[str] = deque()

    def add(self, names: list[str]) -> None:
        self._queue.extend(names)

    def next(self) -> str:
        return self._queue.popleft() if self._queue else ""

    def clear(self) -> int:
        """Drop every fault still queued; how many there were."""
        dropped = len(self._queue)
        self._queue.clear()
        return dropped


class StripeSimulator:
    def __init__(self, engine: SimulatorEngine, api_key: str, webhooks: WebhookSender) -> None:
        self._engine = engine
        self.engine = engine
        self._api_key = api_key
        self._webhooks = webhooks
        self.webhooks = webhooks
        self._params: dict[str, IntentParams] = {}
        self._idempotency = Idempotency()
        self.faults = Faults()
        engine.on_settled(self._settled)

    # ---------------------------------------------------------------- app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._stripe_edge])
        app.router.add_post("/v1/payment_intents", self.create_intent)
        app.router.add_get("/v1/payment_intents", self.list_intents)
        app.router.add_get("/v1/payment_intents/search", self.search_intents)
        app.router.add_get("/v1/payment_intents/{id}", self.retrieve_intent)
        app.router.add_post("/v1/payment_intents/{id}/capture", self.capture_intent)
        app.router.add_post("/v1/payment_intents/{id}/cancel", self.cancel_intent)
        app.router.add_post("/v1/refunds", self.create_refund)
        app.router.add_get("/v1/refunds", self.list_refunds)
        app.router.add_get("/v1/refunds/{id}", self.retrieve_refund)
        app.router.add_post("/_sim/faults", self.add_faults)
        app.router.add_post("/_sim/disputes", self.open_dispute)
        return app

    async def close(self) -> None:
        await self._webhooks.close()
        await self._engine.close()

    @web.middleware
    async def _stripe_edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authentication, queued faults and idempotency, in Stripe's order."""
        if request.path.startswith("/_sim/"):
            return await handler(request)
        try:
            self._authenticate(request)
            fault = self.faults.next()
            await _fault_before(fault)
            if request.method == "POST":
                response = await self._idempotent(request, handler)
            else:
                response = await self._answer(request, handler)
        except StripeProblem as problem:
            return _json(problem.status, problem.body)
        return await _fault_after(fault, request, response)

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        if header != f"Bearer {self._api_key}":
            raise StripeProblem(
                401,
                objects.envelope(
                    "invalid_request_error", "Invalid API Key provided.", "api_key_invalid"
                ),
            )

    async def _idempotent(self, request: web.Request, handler: Handler) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            return await self._answer(request, handler)
        form = await request.post()
        fingerprint = _fingerprint(request.method, request.path, list(form.items()))
        scope = (self._api_key, key)
        stored = self._idempotency.lookup(scope, fingerprint)
        if stored is not None:
            response = _json(stored.status, stored.body)
            response.headers["Idempotent-Replayed"] = "true"
            return response
        self._idempotency.begin(scope)
        answer: StoredAnswer | None = None
        try:
            response = await self._answer(request, handler)
            answer = StoredAnswer(fingerprint, response.status, response[STRIPE_BODY])
        finally:
            self._idempotency.end(scope, answer)
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.Response:
        try:
            response = await handler(request)
        except StripeProblem as problem:
            response = _json(problem.status, problem.body)
        assert isinstance(response, web.Response)
        return response

    # ---------------------------------------------------------------- PaymentIntents

    async def create_intent(self, request: web.Request) -> web.Response:
        form = dict((await request.post()).items())
        key = request.headers.get("Idempotency-Key") or f"auto_{uuid.uuid4().hex}"
        amount = _money(form)
        params = _intent_params(form)
        payment_id = params.metadata.get("payment_id") or f"pi_owner_{uuid.uuid4().hex}"
        authorization_request = AuthorizationRequest(
            idempotency_key=key,
            payment_id=payment_id,
            amount=amount,
            method=_payment_method(form),
            capture=params.capture_method != "manual",
        )
        try:
            authorization = await self._engine.authorize(authorization_request)
        except GatewayTimeout:
            # The engine recorded the charge and "lost" the answer: answer the recorded
            # charge, then drop the connection before the client reads it (see _fault_after).
            request["lost"] = True
            authorization = await self._engine.lookup(key) or _never()
        self._params.setdefault(authorization.reference, params)
        view = await self._view(authorization.reference)
        self._announce_intent(view, key)
        intent = objects.payment_intent(view, self._params_of(view), _expands(form))
        if authorization.outcome is AuthorizationOutcome.DECLINED:
            failure = authorization.failure
            assert failure is not None
            error = objects.error_body(failure, "card_error", payment_intent=intent)
            return _json(402, {"error": error})
        return _json(200, intent)

    async def retrieve_intent(self, request: web.Request) -> web.Response:
        view = await self._view(request.match_info["id"])
        expand = _expands(request.query)
        return _json(200, objects.payment_intent(view, self._params_of(view), expand))

    async def search_intents(self, request: web.Request) -> web.Response:
        found = SEARCH_BY_PAYMENT.match(request.query.get("query", ""))
        if found is None:
            raise invalid("the simulator searches by metadata['payment_id'] only", param="query")
        views = await self._engine.charges_of_payment(found.group(1))
        items = [
            objects.payment_intent(v, self._params_of(v), _expands(request.query)) for v in views
        ]
        return _json(200, objects.search_page(request.path, items))

    async def list_intents(self, request: web.Request) -> web.Response:
        query = request.query
        since = _timestamp(query.get("created[gte]"), datetime.fromtimestamp(0, UTC))
        until = _timestamp(query.get("created[lt]"), datetime.now(UTC).replace(year=9999))
        views = await self._engine.charges_between(since, until)
        after = query.get("starting_after")
        if after:
            ids = [v.reference for v in views]
            views = views[ids.index(after) + 1 :] if after in ids else []
        limit = min(int(query.get("limit", "10")), 100)
        page = views[:limit]
        items = [objects.payment_intent(v, self._params_of(v), True) for v in page]
        return _json(200, objects.list_page(request.path, items, len(views) > limit))

    async def capture_intent(self, request: web.Request) -> web.Response:
        form = dict((await request.post()).items())
        view = await self._view(request.match_info["id"])
        amount = _int(form.get("amount_to_capture"), "amount_to_capture", view.amount.amount_minor)
        key = request.headers.get("Idempotency-Key") or f"auto_{uuid.uuid4().hex}"
        money = Money(view.amount.currency, amount)
        result = await self._engine.capture(view.reference, money, key)
        return await self._after_follow_up(result, view.reference, "payment_intent.succeeded", key)

    async def cancel_intent(self, request: web.Request) -> web.Response:
        view = await self._view(request.match_info["id"])
        key = request.headers.get("Idempotency-Key") or f"auto_{uuid.uuid4().hex}"
        result = await self._engine.void(view.reference, key)
        return await self._after_follow_up(result, view.reference, "payment_intent.canceled", key)

    async def _after_follow_up(
        self, result: GatewayResult, reference: str, event: str, key: str
    ) -> web.Response:
        _raise_refusal(result)
        view = await self._view(reference)
        intent = objects.payment_intent(view, self._params_of(view), False)
        self._webhooks.send(objects.event(event, intent, datetime.now(UTC), key))
        return _json(200, intent)

    # ---------------------------------------------------------------- refunds

    async def create_refund(self, request: web.Request) -> web.Response:
        form = dict((await request.post()).items())
        intent_id = str(form.get("payment_intent", ""))
        if not intent_id:
            raise invalid(
                "Missing required param: payment_intent.", "parameter_missing", "payment_intent"
            )
        view = await self._view(intent_id)
        room = view.captured_minor - view.refunded_minor
        amount = _int(form.get("amount"), "amount", room)
        key = request.headers.get("Idempotency-Key") or f"auto_{uuid.uuid4().hex}"
        result = await self._engine.refund(view.reference, Money(view.amount.currency, amount), key)
        if not result.succeeded and result.failure and result.failure.code == "amount_too_large":
            code = "charge_already_refunded" if room == 0 else "amount_too_large"
            raise invalid(result.failure.message, code, "amount")
        _raise_refusal(result)
        view = await self._view(view.reference)
        item = next(r for r in view.refunds if r.reference == result.reference)
        charge = objects.charge(view, self._params_of(view))
        self._webhooks.send(objects.event("charge.refunded", charge, datetime.now(UTC), key))
        return _json(200, objects.refund(view, item))

    async def list_refunds(self, request: web.Request) -> web.Response:
        """Refunds of one PaymentIntent (the only filter the adapter uses), all in one page."""
        view = await self._view(request.query.get("payment_intent", ""))
        items = [objects.refund(view, item) for item in view.refunds]
        return _json(200, objects.list_page(request.path, items, False))

    async def retrieve_refund(self, request: web.Request) -> web.Response:
        found = await self._engine.refund_record(request.match_info["id"])
        if found is None:
            raise missing("refund", request.match_info["id"])
        view = await self._view(found[0])
        return _json(200, objects.refund(view, found[1]))

    # ---------------------------------------------------------------- test hooks

    async def add_faults(self, request: web.Request) -> web.Response:
        form = await request.post()
        cleared = self.faults.clear() if form.get("clear") else 0
        names = [n for n in str(form.get("faults", "")).split(",") if n]
        self.faults.add(names)
        return web.json_response({"queued": names, "cleared": cleared})

    async def open_dispute(self, request: web.Request) -> web.Response:
        form = await request.post()
        view = await self._view(str(form.get("payment_intent", "")))
        dispute = {
            "id": f"dp_sim_{uuid.uuid4().hex}",
            "object": "dispute",
            "amount": view.captured_minor,
            "currency": view.amount.currency.lower(),
            "charge": objects.charge_id(view),
            "payment_intent": view.reference,
            "reason": str(form.get("reason", "fraudulent")),
            "status": "needs_response",
            "created": objects.unix(datetime.now(UTC)),
        }
        event = objects.event("charge.dispute.created", dispute, datetime.now(UTC), None)
        self._webhooks.send(event)
        return web.json_response(event)

    # ---------------------------------------------------------------- webhooks

    async def _settled(self, _payment_id: str, key: str, authorization: Authorization) -> None:
        self._announce_intent(await self._view(authorization.reference), key)

    def _announce_intent(self, view: ChargeView, key: str) -> None:
        status = objects.intent_status(view)
        kind = {
            "succeeded": "payment_intent.succeeded",
            "requires_capture": "payment_intent.amount_capturable_updated",
            "requires_payment_method": "payment_intent.payment_failed",
            "processing": "payment_intent.processing",
        }.get(status)
        if kind is not None:
            intent = objects.payment_intent(view, self._params_of(view), True)
            self._webhooks.send(objects.event(kind, intent, datetime.now(UTC), key))

    # ---------------------------------------------------------------- helpers

    async def _view(self, reference: str) -> ChargeView:
        view = await self._engine.charge(reference)
        if view is None:
            raise missing("payment_intent", reference)
        return view

    def _params_of(self, view: ChargeView) -> IntentParams:
        """The creation parameters; derived from the ledger after a simulator restart."""
        known = self._params.get(view.reference)
        if known is not None:
            return known
        manual = view.authorization.outcome is AuthorizationOutcome.AUTHORIZED
        return IntentParams(
            "manual" if manual else "automatic", "card", {"payment_id": view.payment_id}
        )


# -------------------------------------------------------------------- request parsing


def _money(form: dict[str, Any]) -> Money:
    amount = _int(form.get("amount"), "amount", None)
    currency = str(form.get("currency", ""))
    if not re.fullmatch(r"[a-zA-Z]{3}", currency):
        raise invalid("Invalid currency.", "parameter_invalid_string", "currency")
    if amount < 1:
        raise invalid("Amount must be at least 1.", "amount_too_small", "amount")
    return Money(currency.upper(), amount)


def _int(value: Any, param: str, default: int | None) -> int:
    if value is None or value == "":
        if default is None:
            raise invalid(f"Missing required param: {param}.", "parameter_missing", param)
        return default
    try:
        return int(str(value))
    except ValueError:
        raise invalid(f"Invalid integer: {value}", "parameter_invalid_integer", param) from None


def _intent_params(form: dict[str, Any]) -> IntentParams:
    capture_method = str(form.get("capture_method", "automatic"))
    if capture_method not in ("automatic", "automatic_async", "manual"):
        raise invalid("Invalid capture_method.", "parameter_invalid_string", "capture_method")
    metadata = {
        name[len("metadata[") : -1]: str(value)
        for name, value in form.items()
        if name.startswith("metadata[") and name.endswith("]")
    }
    method_type = str(form.get("payment_method_data[type]", "card"))
    return IntentParams(capture_method, method_type, metadata)


def _payment_method(form: dict[str, Any]) -> PaymentMethod:
    """Stripe's test payment methods (pm_card_visa) stand for the engine's test tokens
    (tok_visa); payment_method_data carries a token, a VPA, a bank or a payer."""
    named = str(form.get("payment_method", ""))
    if named.startswith("pm_card_"):
        return PaymentMethod(PaymentMethodType.CARD, "tok_" + named[len("pm_card_") :])
    if named:
        return PaymentMethod(PaymentMethodType.CARD, named)
    kind = str(form.get("payment_method_data[type]", ""))
    if kind not in METHOD_TYPES:
        raise invalid(
            "A payment_method or payment_method_data[type] is required.",
            "parameter_missing",
            "payment_method",
        )
    token = next(
        (str(v) for k, v in form.items() if k.startswith(f"payment_method_data[{kind}][")), ""
    )
    return PaymentMethod(METHOD_TYPES[kind], token)


def _expands(params: Any) -> bool:
    return any(
        str(name).startswith("expand[") and value in ("latest_charge", "data.latest_charge")
        for name, value in params.items()
    )


def _timestamp(value: str | None, default: datetime) -> datetime:
    return default if value is None else datetime.fromtimestamp(int(value), UTC)


def _fingerprint(method: str, path: str, items: list[tuple[str, Any]]) -> str:
    canonical = "&".join(f"{k}={v}" for k, v in sorted((k, str(v)) for k, v in items))
    return hashlib.sha256(f"{method} {path}?{canonical}".encode()).hexdigest()


def _raise_refusal(result: GatewayResult) -> None:
    if result.succeeded:
        return
    failure = result.failure
    code = failure.code if failure else "invalid_request"
    message = (failure.message if failure else "") or f"This request cannot be completed: {code}"
    raise invalid(message, REFUSAL_CODES.get(code, code))


def _never() -> Authorization:
    raise AssertionError("the engine recorded the authorization it reported lost")


def _json(status: int, body: dict[str, Any]) -> web.Response:
    response = web.json_response(body, status=status)
    response[STRIPE_BODY] = body
    response.headers["Request-Id"] = f"req_sim_{uuid.uuid4().hex[:14]}"
    return response


# -------------------------------------------------------------------- faults


async def _fault_before(fault: str) -> None:
    if fault == "rate_limit":
        raise StripeProblem(
            429,
            objects.envelope(
                "invalid_request_error",
                "Too many requests hit the API too quickly.",
                "rate_limit",
            ),
        )
    if fault == "server_error":
        raise StripeProblem(
            500, objects.envelope("api_error", "Something went wrong on Stripe's end.")
        )
    if fault == "permission_denied":  # a restricted key without this endpoint's permission
        raise StripeProblem(
            403,
            objects.envelope(
                "invalid_request_error",
                "The provided key does not have the required permissions for this endpoint.",
            ),
        )
    if fault.startswith("slow:"):
        await asyncio.sleep(int(fault.split(":", 1)[1]) / 1000)


async def _fault_after(
    fault: str, request: web.Request, response: web.StreamResponse
) -> web.StreamResponse:
    """A response lost on the way back: the work is done (and its answer stored under
    the idempotency key), but the client sees the connection drop."""
    if fault == "disconnect_after" or request.get("lost"):
        if request.transport is not None:
            request.transport.close()
        raise asyncio.CancelledError
    return response


# -------------------------------------------------------------------- running


@dataclass
class RunningSimulator:
    simulator: StripeSimulator
    runner: web.AppRunner
    port: int

    @property
    def simulator_engine(self) -> SimulatorEngine:
        return self.simulator.engine

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.simulator.close()


async def start_simulator(
    simulator: StripeSimulator, host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    """Serve on host:port (0: any free port) and report the bound port."""
    runner = web.AppRunner(simulator.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    return RunningSimulator(simulator, runner, bound)
