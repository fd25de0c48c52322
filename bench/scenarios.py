"""Scenario registry: a name maps to the RPC it calls and a builder of a worker's n-th call.

Adding a scenario is a builder `(WorkerIdentity, n, prepared) -> Call` plus one registry
entry. Builders are pure and cheap: deterministic keys come from uuid5, not from a cache.
`prepared` holds what the scenario's `prepare` step made before the load started (e.g.
the ids of captured payments to refund); a scenario without one gets an empty tuple.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message
from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

REPLAY_KEYS = 50
STORM_KEYS = 10
STORM_CALLS_PER_ROUND = 100  # per worker: then the storm moves on to 10 new keys
PREPARED_PAYMENTS = 50  # per worker, for GetPayment and Refund
AMOUNT_MINOR = 1999
REFUND_MINOR = 1  # so one payment takes up to AMOUNT_MINOR refunds
CURRENCY = "USD"
CARD_TOKEN = "tok_visa"  # noqa: S105 - a simulated gateway test token, not a secret
SLOW_GATEWAY_MS = (1000, 3000)
_NAMESPACE = uuid.UUID("8f3d6c1e-1b6f-4a53-9a53-2f0f6a1d9b10")


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Who is calling: the worker's pid and the run's tag (shared by all workers)."""

    pid: int
    run_tag: str


@dataclass(frozen=True, slots=True)
class Call:
    request: Message
    idempotency_key: str | None  # None: a read, sent without the header

    @property
    def charge(self) -> api.ChargeRequest:
        assert isinstance(self.request, api.ChargeRequest)
        return self.request


Builder = Callable[[WorkerIdentity, int, Sequence[str]], Call]


@dataclass(frozen=True, slots=True)
class Scenario:
    rpc: str  # the stub's method name
    build: Builder
    measures: str
    prepare_payments: int = 0  # captured payments each worker charges before the load
    prepare: Builder | None = None  # the prepared Charge calls (default: `prepared_charge`)
    server_env: dict[str, str] = field(default_factory=dict)
    # False: the ceiling is no yardstick here (a gateway that takes seconds); the row is
    # compared with its own ideal instead (`ideal_rps`).
    ceiling: bool = True
    # True: an order service (stub process) and NATS JetStream are configured, and the
    # outbox lag (commit -> sink) is measured after the load (bench/collaborators.py).
    collaborators: bool = False
    # True: GATEWAY=stripe (the SDK) against `payment-grpc gateway-sim` in its own process,
    # so the gateway's bookkeeping (its ledger) is off the service's event loop and GIL.
    stripe_simulator: bool = False


def charge_request(order_id: str) -> api.ChargeRequest:
    return api.ChargeRequest(
        order_id=order_id,
        amount=pb.Money(currency=CURRENCY, amount_minor=AMOUNT_MINOR),
        payment_method=pb.PaymentMethod(card=pb.CardMethod(token=CARD_TOKEN)),
    )


def _stable_key(*parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(map(str, parts))))


def unique_charge(who: WorkerIdentity, n: int, prepared: Sequence[str]) -> Call:
    """Every call is a new order with a new key: the plain write path."""
    return Call(charge_request(f"bench-{who.run_tag}-{who.pid}-{n}"), str(uuid.uuid4()))


def prepared_charge(who: WorkerIdentity, n: int, prepared: Sequence[str] = ()) -> Call:
    """The n-th captured payment a worker makes before a GetPayment or Refund load."""
    return Call(charge_request(f"bench-prep-{who.run_tag}-{who.pid}-{n}"), str(uuid.uuid4()))


def replay(who: WorkerIdentity, n: int, prepared: Sequence[str]) -> Call:
    """Each worker charges REPLAY_KEYS orders, then re-sends them with the same keys."""
    slot = n % REPLAY_KEYS
    key = _stable_key(who.run_tag, "replay", who.pid, slot)
    return Call(charge_request(f"bench-{who.run_tag}-{who.pid}-{slot}"), key)


def storm(who: WorkerIdentity, n: int, prepared: Sequence[str]) -> Call:
    """All workers race on the same STORM_KEYS (key, body) pairs of a round; a new round
    of keys every STORM_CALLS_PER_ROUND calls, so first executions (and the ABORTED
    answers around them) keep happening inside the measured window, not only replays."""
    round_, slot = n // STORM_CALLS_PER_ROUND, n % STORM_KEYS
    key = _stable_key(who.run_tag, "storm", round_, slot)
    return Call(charge_request(f"bench-storm-{who.run_tag}-{round_}-{slot}"), key)


def get_payment(who: WorkerIdentity, n: int, prepared: Sequence[str]) -> Call:
    """Reads of the worker's prepared payments, round robin."""
    return Call(api.GetPaymentRequest(payment_id=prepared[n % len(prepared)]), None)


def refund(who: WorkerIdentity, n: int, prepared: Sequence[str]) -> Call:
    """A 0.01 refund of a captured payment (round robin over the prepared ones, so
    concurrent refunds of one payment are rare but happen), a new key each."""
    request = api.RefundRequest(
        payment_id=prepared[n % len(prepared)],
        amount=pb.Money(currency=CURRENCY, amount_minor=REFUND_MINOR),
    )
    return Call(request, str(uuid.uuid4()))


_SLOW = {
    "GATEWAY_LATENCY_MS_MIN": str(SLOW_GATEWAY_MS[0]),
    "GATEWAY_LATENCY_MS_MAX": str(SLOW_GATEWAY_MS[1]),
}

SCENARIOS: dict[str, Scenario] = {
    "charge": Scenario(
        "Charge", unique_charge, "throughput/latency of new charges (unique key and order)"
    ),
    "charge-events": Scenario(
        "Charge",
        unique_charge,
        "new charges with an order service (GetOrder per charge, NotifyPaymentOutcome via the"
        " outbox) and NATS JetStream (every event published); outbox lag commit -> sink",
        collaborators=True,
    ),
    "charge-stripe": Scenario(
        "Charge",
        unique_charge,
        "new charges with GATEWAY=stripe against the Stripe-compatible simulator in its own"
        " process (latency 0): the gateway's ledger off the service's event loop and GIL",
        stripe_simulator=True,
    ),
    "get": Scenario(
        "GetPayment",
        get_payment,
        f"GetPayment of {PREPARED_PAYMENTS} prepared payments per worker",
        prepare_payments=PREPARED_PAYMENTS,
    ),
    "refund": Scenario(
        "Refund",
        refund,
        f"refunds of 0.01 spread over {PREPARED_PAYMENTS} captured payments per worker",
        prepare_payments=PREPARED_PAYMENTS,
    ),
    "replay": Scenario(
        "Charge",
        replay,
        f"re-sends of {REPLAY_KEYS} keys per worker (idempotent replay)",
        prepare_payments=REPLAY_KEYS,
        prepare=replay,
    ),
    "storm": Scenario(
        "Charge", storm, f"all clients race on {STORM_KEYS} shared keys per round (duplicate storm)"
    ),
    "slow-gateway": Scenario(
        "Charge",
        unique_charge,
        f"new charges against a gateway taking {SLOW_GATEWAY_MS[0]}-{SLOW_GATEWAY_MS[1]} ms",
        server_env=_SLOW,
        ceiling=False,
    ),
}


def ideal_rps(scenario: Scenario, in_flight: int) -> float | None:
    """What a scenario without a ceiling could reach at best: in-flight / mean latency."""
    if scenario.server_env is _SLOW:
        return in_flight / (sum(SLOW_GATEWAY_MS) / 2 / 1000)
    return None
