"""What every use case shares: ports plus the one way to commit a change."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from payment_grpc.domain.errors import ReportableError
from payment_grpc.domain.payment import PaymentEvent
from payment_grpc.service.idempotency import Checkpoint
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

    async def announce(self, events: Sequence[PaymentEvent]) -> None:
        """Tell watchers about committed events (call only after commit)."""
        for event in events:
            await self.bus.publish(event.payment_id, event.sequence)

    async def finish(self, checkpoint: Checkpoint, result: object) -> None:
        """Store the answer of an execution whose change was already committed."""
        async with self.uow() as tx:
            await checkpoint.finish(tx, result)
            await tx.commit()

    async def refuse(self, checkpoint: Checkpoint, refusal: ReportableError) -> None:
        """Store a refusal that was already settled as the execution's answer."""
        async with self.uow() as tx:
            await checkpoint.refuse(tx, refusal)
            await tx.commit()


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
