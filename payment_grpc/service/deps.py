"""What every use case shares: the ports (the one way to commit a change is
service/changes.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from payment_grpc.service.ports import (
    Clock,
    Faults,
    PaymentGateway,
    StatusBus,
    UnitOfWorkFactory,
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class Records:
    """What recording a change needs: no gateway, so the inbound side (GatewayNews) can
    be built before the gateway adapter that delivers to it."""

    uow: UnitOfWorkFactory
    bus: StatusBus
    clock: Clock
    faults: Faults


@dataclass(frozen=True, slots=True)
class Deps(Records):
    """What the outbound use cases share: the records plus the gateway they call."""

    gateway: PaymentGateway


def authorize_key(payment_id: str) -> str:
    return f"{payment_id}:authorize"


def capture_key(payment_id: str) -> str:
    return f"{payment_id}:capture"


def void_key(payment_id: str) -> str:
    return f"{payment_id}:void"
