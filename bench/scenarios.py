"""Scenario registry: a name maps to a builder of the n-th Charge call of a worker.

Adding a scenario is a function `(WorkerIdentity, n) -> Call` plus one registry entry.
Builders are pure and cheap: deterministic keys come from uuid5, not from a cache.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from payments.v1 import payment_service_pb2 as api
from payments.v1 import resources_pb2 as pb

REPLAY_KEYS = 50
STORM_KEYS = 10
STORM_CALLS_PER_ROUND = 100  # per worker: then the storm moves on to 10 new keys
AMOUNT_MINOR = 1999
CURRENCY = "USD"
CARD_TOKEN = "tok_visa"  # noqa: S105 - a simulated gateway test token, not a secret
_NAMESPACE = uuid.UUID("8f3d6c1e-1b6f-4a53-9a53-2f0f6a1d9b10")


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Who is calling: the worker's pid and the run's tag (shared by all workers)."""

    pid: int
    run_tag: str


@dataclass(frozen=True, slots=True)
class Call:
    request: api.ChargeRequest
    idempotency_key: str


Builder = Callable[[WorkerIdentity, int], Call]


@dataclass(frozen=True, slots=True)
class Scenario:
    build: Builder
    measures: str


def charge_request(order_id: str) -> api.ChargeRequest:
    return api.ChargeRequest(
        order_id=order_id,
        amount=pb.Money(currency=CURRENCY, amount_minor=AMOUNT_MINOR),
        payment_method=pb.PaymentMethod(card=pb.CardMethod(token=CARD_TOKEN)),
    )


def _stable_key(*parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(map(str, parts))))


def unique_charge(who: WorkerIdentity, n: int) -> Call:
    """Every call is a new order with a new key: the plain write path."""
    return Call(charge_request(f"bench-{who.pid}-{n}"), str(uuid.uuid4()))


def replay(who: WorkerIdentity, n: int) -> Call:
    """Each worker charges REPLAY_KEYS orders, then re-sends them with the same keys."""
    slot = n % REPLAY_KEYS
    key = _stable_key(who.run_tag, "replay", who.pid, slot)
    return Call(charge_request(f"bench-{who.pid}-{slot}"), key)


def storm(who: WorkerIdentity, n: int) -> Call:
    """All workers race on the same STORM_KEYS (key, body) pairs of a round; a new round
    of keys every STORM_CALLS_PER_ROUND calls, so first executions (and the ABORTED
    answers around them) keep happening inside the measured window, not only replays."""
    round_, slot = n // STORM_CALLS_PER_ROUND, n % STORM_KEYS
    key = _stable_key(who.run_tag, "storm", round_, slot)
    return Call(charge_request(f"bench-storm-{who.run_tag}-{round_}-{slot}"), key)


SCENARIOS: dict[str, Scenario] = {
    "charge": Scenario(unique_charge, "throughput/latency of new charges (unique key and order)"),
    "replay": Scenario(replay, f"re-sends of {REPLAY_KEYS} keys per worker (idempotent replay)"),
    "storm": Scenario(
        storm, f"all clients race on {STORM_KEYS} shared keys per round (duplicate storm)"
    ),
}
