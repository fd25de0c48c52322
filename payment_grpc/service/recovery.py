"""Finishes work a crash or a gateway timeout left half done.

Runs periodically in every replica. Safe to run twice at once: each item is finished
by a gateway call with the same derived key (the gateway dedupes) and recorded under
the row lock only if it is still unfinished. Abandoned idempotency keys come after the
money side: under the key's row lock, each gets the answer the client's retry would
have stored, so that retry is a replay. One failing item never stops the pass: it is
logged and tried again next time, and the reaper always runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from payment_grpc.domain.errors import ReportableError
from payment_grpc.domain.payment import Payment, PaymentStatus
from payment_grpc.domain.refund import Refund, RefundStatus
from payment_grpc.service.charging import Charging
from payment_grpc.service.context import SYSTEM
from payment_grpc.service.deps import Deps, authorize_key
from payment_grpc.service.errors import StorageUnavailable
from payment_grpc.service.idempotency import IdempotencyKeys
from payment_grpc.service.operations import (
    CANCEL,
    CAPTURE,
    Operations,
    claimed_operation,
    outcome_of_released_claim,
)
from payment_grpc.service.ports import (
    AnswerEncoder,
    AuthorizationOutcome,
    KeyRecord,
    Operation,
    RecoveryPoint,
    StoredAnswer,
    UnitOfWork,
)
from payment_grpc.service.settlements import Settlements

log = logging.getLogger(__name__)
BATCH = 100


@dataclass(frozen=True, slots=True)
class PassReport:
    settled: int  # payments and refunds taken to their outcome
    keys: int  # abandoned idempotency keys answered or released by this pass


@dataclass(frozen=True, slots=True)
class _Item:
    label: str
    work: Callable[[], Awaitable[bool]]  # True when it finished something


@dataclass(eq=False)
class Recovery:
    deps: Deps
    charging: Charging
    settlements: Settlements
    operations: Operations
    keys: IdempotencyKeys
    stale_after: timedelta
    encode_answer: AnswerEncoder
    encode_refusal: Callable[[ReportableError], StoredAnswer]
    authorization_hold: timedelta | None = None
    _passes: int = field(init=False, default=0)
    _pass_done: asyncio.Condition = field(init=False, repr=False, default_factory=asyncio.Condition)

    async def run_forever(self, interval_s: float) -> None:
        paused = False  # by a storage outage: said once when it starts, once when it ends
        while True:
            try:
                await self.run_once()
            except StorageUnavailable as outage:
                if not paused:
                    log.warning("recovery paused: %s; retrying every %ss", outage, interval_s)
                paused = True
            except Exception:
                log.exception("recovery pass failed; trying again next interval")
            else:
                if paused:
                    log.info("recovery resumed: the database answers again")
                paused = False
            await self._count_pass()
            await asyncio.sleep(interval_s)

    @property
    def completed_passes(self) -> int:
        """Periodic passes completed since the worker started (the first runs at once)."""
        return self._passes

    async def wait_for_passes(self, total: int) -> None:
        """Return once the periodic worker has completed `total` passes."""
        async with self._pass_done:
            await self._pass_done.wait_for(lambda: self._passes >= total)

    async def _count_pass(self) -> None:
        async with self._pass_done:
            self._passes += 1
            self._pass_done.notify_all()

    async def run_once(self) -> PassReport:
        """One pass: settle the money side, then answer abandoned keys, then reap."""
        settled = await self._run_all("stale payments and refunds", self._money_items)
        settled += await self._run_all("expired authorizations", self._expired_items)
        keys = await self._run_all("abandoned idempotency keys", self._key_items)
        await self._attempt(_Item("reaping expired idempotency keys", self._reap))
        if settled or keys:
            log.info("recovery settled %d items and finished %d idempotency keys", settled, keys)
        return PassReport(settled, keys)

    async def _run_all(self, what: str, find: Callable[[], Awaitable[list[_Item]]]) -> int:
        try:
            items = await find()
        except StorageUnavailable:
            raise  # the whole pass waits for the database (run_forever says so once)
        except Exception:
            log.exception("recovery could not list %s; trying again next pass", what)
            return 0
        return sum([await self._attempt(item) for item in items])

    async def _attempt(self, item: _Item) -> int:
        try:
            return int(await item.work())
        except StorageUnavailable:
            raise
        except ReportableError as exc:  # gateway errors too: retried next pass
            log.info("recovery: %s not finished yet: %s", item.label, exc)
        except Exception:
            log.exception("recovery: %s failed; trying again next pass", item.label)
        return 0

    # ------------------------------------------------------------ money side

    async def _money_items(self) -> list[_Item]:
        cutoff = self.deps.clock.now() - self.stale_after
        async with self.deps.uow(read_only=True) as tx:
            payments = await tx.payments.stale(cutoff, BATCH)
            refunds = await tx.refunds.stale_pending(cutoff, BATCH)
        return [
            *(
                _Item(f"payment {p.payment_id}", functools.partial(self._payment, p))
                for p in payments
            ),
            *(_Item(f"refund {r.refund_id}", functools.partial(self._refund, r)) for r in refunds),
        ]

    async def _payment(self, payment: Payment) -> bool:
        if claimed_operation(payment.in_flight) == CANCEL:
            await self.operations.finish_cancel(payment, SYSTEM)
        elif payment.in_flight:
            await self.operations.finish_capture(payment, SYSTEM)
        elif payment.status is PaymentStatus.PROCESSING:
            await self._settle_processing(payment)
        return True

    async def _settle_processing(self, payment: Payment) -> None:
        known = await self.deps.gateway.lookup(authorize_key(payment.payment_id))
        if known is None:
            await self.charging.authorize(payment, SYSTEM)  # never reached the gateway
        elif known.outcome is not AuthorizationOutcome.PENDING:
            await self.settlements.record(payment.payment_id, known, SYSTEM)

    async def _expired_items(self) -> list[_Item]:
        """Authorizations held longer than the PSP keeps them: void before they lapse."""
        if self.authorization_hold is None:
            return []
        cutoff = self.deps.clock.now() - self.authorization_hold
        async with self.deps.uow(read_only=True) as tx:
            expired = await tx.payments.authorized_before(cutoff, BATCH)
        return [
            _Item(f"expired authorization {p.payment_id}", functools.partial(self._expire, p))
            for p in expired
        ]

    async def _expire(self, payment: Payment) -> bool:
        expired = await self.operations.expire(payment.payment_id, SYSTEM)
        return expired.status is PaymentStatus.CANCELED

    async def _refund(self, refund: Refund) -> bool:
        await self.operations.finish_refund(refund, SYSTEM)
        return True

    # ------------------------------------------------------------ keys

    async def _key_items(self) -> list[_Item]:
        return [
            _Item(f"idempotency key {k.record_id}", functools.partial(self._key, k))
            for k in await self.keys.abandoned(BATCH)
        ]

    async def _key(self, record: KeyRecord) -> bool:
        return await self.keys.finish_abandoned(record, _settled_result, self._answer_of)

    def _answer_of(self, record: KeyRecord, outcome: object) -> StoredAnswer:
        if isinstance(outcome, ReportableError):
            return self.encode_refusal(outcome)
        return StoredAnswer(0, self.encode_answer(record.operation, outcome))

    async def _reap(self) -> bool:
        return await self.keys.reap() > 0


async def _settled_result(tx: UnitOfWork, record: KeyRecord) -> object | None:
    """What a retry of the key would store now (as the use cases' resume paths do), or
    None while the retry would still have to reach the gateway."""
    if record.refund_id:
        refund = await tx.refunds.get(record.refund_id)
        if refund.status is RefundStatus.PENDING:
            return None
        return refund, await tx.payments.get(refund.payment_id)
    if record.payment_id is None:
        return None
    payment = await tx.payments.get(record.payment_id)
    if record.recovery_point is RecoveryPoint.PAYMENT_CREATED:
        return None if payment.status is PaymentStatus.PROCESSING else payment
    if payment.in_flight:
        return None
    # A key at OPERATION_CLAIMED belongs to a capture or a cancel; once the claim is gone,
    # the key's operation is the only record of which one.
    return outcome_of_released_claim(_CLAIMS[record.operation], payment)


_CLAIMS = {Operation.CAPTURE: CAPTURE, Operation.CANCEL: CANCEL}
