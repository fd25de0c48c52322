"""Idempotency keys: exactly-once execution of mutating calls (Stripe-style atomic phases).

`IdempotencyKeys.begin` claims a key for one execution or returns the stored answer.
The use case then advances the key's recovery point inside its own transactions through a
`Checkpoint`, and stores the final answer in the same transaction as the final change. A
retry after a crash resumes from the recorded point; nothing is executed twice because
every gateway call uses a key derived from ids recorded before it. Keys no execution holds
any more are finished by the recovery worker (`abandoned`, `finish_abandoned`).

A claim is a lease: the holder's `locked_at` says when it last confirmed it is working on
the key. This process renews the keys it holds every third of the lease (`renew_forever`);
a key whose lease ran out (its replica died, or stalled that long) may be taken over by any
replica, which resumes it from its recovery point. Claims and releases run to their end
even when the call that started them is cancelled (a deadline, a client gone), so an
interrupted call never leaves its key held behind it.

A Charge's or a Refund's key is claimed by its first write instead (`unclaimed`,
`claim_in`): one INSERT ... ON CONFLICT DO NOTHING at the head of the transaction that
creates the payment (inserts the refund), so the claim costs no transaction of its own. A
key already there is decided in that transaction (`KeyDecided`: a stored answer, a
conflict) or claimed the usual way.

Final answers committed or read here are kept in this process (`FinalAnswers`): a replay
of one is answered by `begin` / `unclaimed` before any database work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from payment_grpc.domain.errors import ReportableError
from payment_grpc.service.errors import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    StorageUnavailable,
)
from payment_grpc.service.final_answers import FinalAnswers
from payment_grpc.service.ports import (
    ChargeRefusal,
    Clock,
    KeyRecord,
    Operation,
    RecoveryPoint,
    StoredAnswer,
    UnitOfWork,
    UnitOfWorkFactory,
)

log = logging.getLogger(__name__)

# Reads what an abandoned key's execution came to from the current state (a result, or a
# refusal); None while the money side is not settled yet.
OutcomeReader = Callable[[UnitOfWork, KeyRecord], Awaitable[object | None]]
# The key's stored answer for such an outcome.
AnswerEncoding = Callable[[KeyRecord, object], StoredAnswer]
# A checkpoint's step inside a use case's transaction (see service/changes.py).
Mark = Callable[[UnitOfWork], Awaitable[None]]
# What names one key: (scope, operation, key).
KeyIdentity = tuple[str, Operation, str]


@dataclass(frozen=True, slots=True)
class IdempotencyPolicy:
    owner: str  # this process's identity; stable across restarts of the same replica
    retention: timedelta = timedelta(hours=72)
    # The lease: a lock not renewed for this long is free (its holder is gone). The holder
    # renews it every third of this (IDEMPOTENCY_LEASE_SECONDS).
    lock_timeout: timedelta = timedelta(seconds=10)

    @property
    def renew_every_s(self) -> float:
        return self.lock_timeout.total_seconds() / 3


RENEW_BATCH = 500  # keys renewed per statement
RELEASE_RETRY_FIRST_S = 0.05  # a release that met a busy database is tried again after
RELEASE_RETRY_MAX_S = 1.0  # this, doubling up to this


class KeyDecided(Exception):
    """A claim merged into an execution's first write met the key already there, so that
    execution wrote nothing: `found` is what the key answers (a stored answer to replay,
    a conflict to raise), or None: claim the key the usual way (`begin`) and run again
    (a key to resume, an expired one, one whose release this process could not write)."""

    def __init__(self, found: StoredAnswer | ReportableError | None) -> None:
        super().__init__(found)
        self.found = found


class IdempotencyKeys:
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        clock: Clock,
        policy: IdempotencyPolicy,
        leases: UnitOfWorkFactory | None = None,
        answers: FinalAnswers | None = None,
    ) -> None:
        """`leases`: where lease renewals write, when not through `uow`. The composition
        root gives them a connection of their own: a renewal that waited behind calls for
        a pooled connection (a pool saturated by slow calls) could let the leases run out
        while their calls still run, and another replica take the keys over.
        `answers`: the final answers kept in this process (a bounded cache by default)."""
        self._uow = uow
        self.answers = answers if answers is not None else FinalAnswers()
        self._leases = leases or uow
        self._clock = clock
        self._policy = policy
        self._holding: set[str] = set()  # record ids of the keys this process executes
        self._pending: set[asyncio.Task[Any]] = set()  # claims/releases run to their end
        # The clean-ups (release, stored answer) still running for each key, by identity.
        self._cleaning: dict[KeyIdentity, set[asyncio.Task[Any]]] = {}

    @property
    def holding(self) -> int:
        """How many keys this process holds right now (their leases are renewed)."""
        return len(self._holding)

    async def begin(
        self, scope: str, operation: Operation, key: str, fingerprint: str
    ) -> KeyRecord | StoredAnswer:
        """Claim the key for this execution, or return the stored answer.

        Raises IdempotencyKeyReused for another request under the same key, and
        IdempotencyKeyInUse while another execution holds it. A claimed key must be given
        back with `release`, `store_answer` or `done`. If the caller is cancelled while
        the claim runs (its COMMIT may already have happened), the claim still runs to its
        end and a key it took is released before the cancellation goes on.
        """
        identity = (scope, operation, key)
        kept = await self._kept(identity, fingerprint)
        if isinstance(kept, IdempotencyKeyReused):
            raise kept
        if kept is not None:
            return kept
        claiming = self._run_to_end(self._begin(scope, operation, key, fingerprint))
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            await asyncio.shield(self._run_to_end(self._give_back(claiming), identity))
            raise

    async def unclaimed(
        self, scope: str, operation: Operation, key: str, fingerprint: str
    ) -> KeyRecord:
        """The record a claim merged into the execution's first write inserts
        (`claim_in`); nothing is written yet. Like `begin`, it waits for the clean-ups of
        an interrupted call with the key first. A final answer kept in this process is
        decided at once (KeyDecided), as the claim would decide it."""
        kept = await self._kept((scope, operation, key), fingerprint)
        if kept is not None:
            raise KeyDecided(kept)
        return self._new_record(scope, operation, key, fingerprint, self._clock.now())

    async def _kept(
        self, identity: KeyIdentity, fingerprint: str
    ) -> StoredAnswer | IdempotencyKeyReused | None:
        """Once the clean-ups of an interrupted call with the key are over: what the key's
        final answer kept in this process says to this request (None: not kept here)."""
        await self._after_cleanups(identity)
        return self.answers.answer(*identity, fingerprint, self._clock.now())

    async def claim_in(self, tx: UnitOfWork, record: KeyRecord) -> None:
        """Claim the key in `tx`, the execution's first write, with `record` (from
        `unclaimed`, at the recovery point that write reaches). Run it first in `tx`: a
        concurrent claim of the key waits on this INSERT (PostgreSQL's unique index,
        SQLite's writer lock) before it has written anything, and then finds the key.
        Held before the claim is visible (COMMIT), as in `begin`. A key already there
        raises KeyDecided: the caller rolls `tx` back, nothing of it is written."""
        if await tx.idempotency.insert_if_absent(record):
            self._holding.add(record.record_id)
            return
        existing = await self._current(tx, record)
        raise KeyDecided(self._decided(existing, record, self._clock.now()))

    def _decided(
        self, existing: KeyRecord | None, fresh: KeyRecord, now: datetime
    ) -> StoredAnswer | ReportableError | None:
        """What a key found by `claim_in` answers, as `_existing` would decide it
        without writing; None where `begin` must take it (resume, delete an expired key)."""
        if existing is None or existing.expires_at <= now:
            return None
        return self._verdict(existing, fresh, now)

    def _verdict(
        self, existing: KeyRecord, fresh: KeyRecord, now: datetime
    ) -> StoredAnswer | ReportableError | None:
        """What an unexpired key already there answers `fresh` with: its stored answer, a
        conflict, or None: no execution holds it, so this one may resume it."""
        if existing.fingerprint != fresh.fingerprint:
            return IdempotencyKeyReused()
        if existing.recovery_point is RecoveryPoint.FINISHED:
            assert existing.response_code is not None
            self.answers.remember(existing)  # committed by its execution: final
            return StoredAnswer(existing.response_code, existing.response_body or b"")
        if self._held(existing, now) and not self._ended_here(existing):
            return IdempotencyKeyInUse()
        return None

    async def _after_cleanups(self, identity: KeyIdentity) -> None:
        """A retry right after an interrupted call waits here for that call's release (or
        stored answer), which is already under way, instead of meeting its key still held
        (IDEMPOTENCY_KEY_IN_USE). If the release could not be written (a busy database),
        the key is this process's and no execution holds it: the claim resumes it."""
        cleaning = self._cleaning.get(identity)
        if cleaning:
            await asyncio.wait(set(cleaning))

    async def _begin(
        self, scope: str, operation: Operation, key: str, fingerprint: str
    ) -> KeyRecord | StoredAnswer:
        now = self._clock.now()
        fresh = self._new_record(scope, operation, key, fingerprint, now)
        claimed: KeyRecord | None = None
        try:
            async with self._uow() as tx:
                outcome = await self._claim(tx, fresh, now)
                if isinstance(outcome, KeyRecord):
                    # Held before the claim is visible: another claim in this process that
                    # finds the key locked by this owner knows an execution is running.
                    claimed = outcome
                    self._holding.add(claimed.record_id)
                await tx.commit()
        except BaseException:
            if claimed is not None:  # no execution follows a claim that failed
                self._holding.discard(claimed.record_id)
            raise
        return outcome

    async def _give_back(self, claiming: asyncio.Task[KeyRecord | StoredAnswer]) -> None:
        """Release what a claim whose caller went away took, once the claim is over."""
        try:
            outcome = await claiming
        except Exception:  # nothing was claimed
            return
        if isinstance(outcome, KeyRecord):
            await self._release(outcome)

    def _run_to_end(
        self, work: Coroutine[Any, Any, Any], cleaning: KeyIdentity | None = None
    ) -> asyncio.Task[Any]:
        """A task that finishes even if whoever awaits it is cancelled; `settle` waits
        for the ones still running (at shutdown). `cleaning`: the key it gives back or
        answers, which a new claim of that key waits for (`_after_cleanups`)."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        if cleaning is not None:
            self._cleaning.setdefault(cleaning, set()).add(task)
        task.add_done_callback(functools.partial(self._finished_in_background, cleaning))
        return task

    def _finished_in_background(
        self, cleaning: KeyIdentity | None, task: asyncio.Task[Any]
    ) -> None:
        self._pending.discard(task)
        if cleaning is not None:
            tasks = self._cleaning.get(cleaning, set())
            tasks.discard(task)
            if not tasks:
                self._cleaning.pop(cleaning, None)
        if task.cancelled():
            return
        error = task.exception()  # retrieved here: the caller that awaited it may be gone
        if error is not None and not isinstance(error, ReportableError):
            # The key's lease runs out on its own: this process no longer renews it.
            log.debug("idempotency key bookkeeping failed: %r", error)

    async def settle(self, timeout_s: float) -> None:
        """Wait (at most timeout_s) for claims and releases of interrupted calls."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout_s)

    async def _claim(
        self, tx: UnitOfWork, fresh: KeyRecord, now: datetime
    ) -> KeyRecord | StoredAnswer:
        if await tx.idempotency.insert_if_absent(fresh):
            return fresh
        existing = await self._current(tx, fresh)
        if existing is not None and existing.expires_at <= now:
            await tx.idempotency.delete(existing.record_id)  # an expired key is a new request
            existing = None
        if existing is not None:
            return await self._existing(tx, existing, fresh, now)
        if await tx.idempotency.insert_if_absent(fresh):
            return fresh
        # Another call claimed the key between our read and our insert (it waited on the
        # expired row's lock too): its claim decides, as if it had been there first.
        return await self._claimed_by_another(tx, fresh, now)

    async def _claimed_by_another(
        self, tx: UnitOfWork, fresh: KeyRecord, now: datetime
    ) -> KeyRecord | StoredAnswer:
        winner = await self._current(tx, fresh)
        if winner is None or winner.expires_at <= now:
            raise IdempotencyKeyInUse()  # gone again already: the caller retries
        return await self._existing(tx, winner, fresh, now)

    async def _current(self, tx: UnitOfWork, record: KeyRecord) -> KeyRecord | None:
        """The stored row of the record's (scope, operation, key), under its row lock."""
        return await tx.idempotency.get_for_update(record.scope, record.operation, record.key)

    async def _existing(
        self, tx: UnitOfWork, existing: KeyRecord, fresh: KeyRecord, now: datetime
    ) -> KeyRecord | StoredAnswer:
        verdict = self._verdict(existing, fresh, now)
        if isinstance(verdict, ReportableError):
            raise verdict
        if verdict is not None:
            return verdict
        resumed = replace(existing, locked_by=self._policy.owner, locked_at=now)
        await tx.idempotency.save(resumed)
        return resumed

    def _ended_here(self, record: KeyRecord) -> bool:
        """Locked by this process, which no longer executes it: the call that held it was
        cut and its release could not be written. This process knows, without waiting
        for the lease to run out, that nobody works on the key. (INSTANCE_ID is unique
        among live processes: the owner names this one.)"""
        return record.locked_by == self._policy.owner and record.record_id not in self._holding

    def _held(self, record: KeyRecord, now: datetime) -> bool:
        """Locked by an execution that may still be running (its lock is not stale)."""
        return record.locked_at is not None and record.locked_at > now - self._policy.lock_timeout

    def _new_record(
        self, scope: str, operation: Operation, key: str, fingerprint: str, now: datetime
    ) -> KeyRecord:
        return KeyRecord(
            record_id=f"idk_{uuid.uuid4().hex}",
            scope=scope,
            operation=operation,
            key=key,
            fingerprint=fingerprint,
            recovery_point=RecoveryPoint.STARTED,
            created_at=now,
            expires_at=now + self._policy.retention,
            locked_by=self._policy.owner,
            locked_at=now,
        )

    async def store_answer(
        self, record: KeyRecord, answer: StoredAnswer, refusal: ChargeRefusal | None = None
    ) -> None:
        """Keep a business error as the key's final answer (nothing changed for it), and
        publish `refusal` through the outbox in the same transaction (the saga's
        `payment.failed` without a payment): a replay of the key never writes it again."""
        storing = self._store_answer(record, answer, refusal)
        await asyncio.shield(self._run_to_end(storing, _identity(record)))

    async def _store_answer(
        self, record: KeyRecord, answer: StoredAnswer, refusal: ChargeRefusal | None
    ) -> None:
        finished = _finished(record, answer)
        try:
            async with self._uow() as tx:
                await tx.idempotency.save(finished)
                if refusal is not None:
                    tx.publish_refusal(refusal)
                await tx.commit()
            self.answers.remember(finished)
        finally:
            self.done(record)

    async def release(self, record: KeyRecord) -> None:
        """Give the key back after a retryable failure or an interruption: a retry runs
        (nothing was created yet) or resumes from the recorded point. Runs to its end even
        if the caller is cancelled meanwhile."""
        await asyncio.shield(self._run_to_end(self._release(record), _identity(record)))

    async def _release(self, record: KeyRecord) -> None:
        """Released, tried again while the database is busy (a lock or pool timeout): a
        release that gives up leaves the key to its lease, so it is tried for that long."""
        give_up_at = time.monotonic() + self._policy.lock_timeout.total_seconds()
        delay_s = RELEASE_RETRY_FIRST_S
        try:
            while True:
                try:
                    return await self._release_once(record)
                except StorageUnavailable:
                    if time.monotonic() + delay_s >= give_up_at:
                        raise
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RELEASE_RETRY_MAX_S)
        finally:
            self.done(record)

    async def _release_once(self, record: KeyRecord) -> None:
        async with self._uow() as tx:
            current = await self._current(tx, record)
            if current is None or current.recovery_point is RecoveryPoint.FINISHED:
                return
            if current.record_id != record.record_id:
                return  # another claim's row (ours never committed: a claim in a write)
            if current.locked_by not in (None, self._policy.owner):
                return  # taken over after our lease ran out: no longer ours to give
            if current.recovery_point is RecoveryPoint.STARTED:
                await tx.idempotency.delete(current.record_id)
            else:
                await tx.idempotency.save(replace(current, locked_by=None, locked_at=None))
            await tx.commit()

    def done(self, record: KeyRecord) -> None:
        """This process no longer works on the key (its answer is stored, or it was
        released): its lease is not renewed any more."""
        self._holding.discard(record.record_id)

    async def renew_leases(self) -> int:
        """Confirm that this process still works on the keys it holds; the count renewed."""
        held = sorted(self._holding)
        renewed = 0
        for start in range(0, len(held), RENEW_BATCH):
            async with self._leases() as tx:
                renewed += await tx.idempotency.renew(
                    held[start : start + RENEW_BATCH], self._policy.owner, self._clock.now()
                )
                await tx.commit()
        return renewed

    async def renew_forever(self) -> None:
        """Renew the held keys' leases every third of the lease, until cancelled. A failed
        renewal is said once (and once when renewals work again): with the database away,
        nobody can take the keys over meanwhile either."""
        failing = False
        while True:
            await asyncio.sleep(self._policy.renew_every_s)
            try:
                await self.renew_leases()
            except Exception as error:  # tried again next interval
                if not failing:
                    log.warning("could not renew idempotency key leases: %s", error)
                failing = True
            else:
                if failing:
                    log.info("idempotency key leases renewed again")
                failing = False

    async def reap(self, limit: int = 1000) -> int:
        async with self._uow() as tx:
            removed = await tx.idempotency.delete_expired(self._clock.now(), limit)
            await tx.commit()
        return removed

    async def abandoned(self, limit: int) -> list[KeyRecord]:
        """Unfinished keys no live execution holds (unlocked, or the lock went stale)."""
        now = self._clock.now()
        async with self._uow(read_only=True) as tx:
            return await tx.idempotency.abandoned(now - self._policy.lock_timeout, now, limit)

    async def finish_abandoned(
        self, record: KeyRecord, settled_of: OutcomeReader, answer_of: AnswerEncoding
    ) -> bool:
        """Finish a key nobody holds, under its row lock so two replicas never both do:
        a key still at STARTED (nothing created) is released so a retry runs fresh; any
        other gets the answer for the outcome `settled_of` reads from the current state,
        or stays open while that is unsettled (None). The answer is encoded before the
        key's write transaction; if the outcome moved meanwhile, the next pass finishes
        it. True if the key was finished or released."""
        answer = None
        if record.recovery_point is not RecoveryPoint.STARTED:
            async with self._uow(read_only=True) as tx:
                outcome = await settled_of(tx, record)
            if outcome is None:
                return False
            answer = answer_of(record, outcome)
        now = self._clock.now()
        async with self._uow() as tx:
            current = await self._current(tx, record)
            if current is None or not self._abandoned(current, record, now):
                return False
            if current.recovery_point is RecoveryPoint.STARTED:
                await tx.idempotency.delete(current.record_id)
            elif answer is None or not same_outcome(await settled_of(tx, current), outcome):
                return False
            else:
                finished = _finished(current, answer)
                await tx.idempotency.save(finished)
                tx.on_commit(functools.partial(self.answers.remember, finished))
            await tx.commit()
        return True

    def _abandoned(self, current: KeyRecord, listed: KeyRecord, now: datetime) -> bool:
        return (
            current.record_id == listed.record_id
            and current.recovery_point is not RecoveryPoint.FINISHED
            and current.expires_at > now
            and not self._held(current, now)
        )

    async def release_own_locks(self) -> int:
        """At start-up: keys this replica held when it last died can be resumed at once.
        At shutdown, once no call runs any more: what the cut calls held, likewise."""
        async with self._uow() as tx:
            released = await tx.idempotency.release_locks_of(self._policy.owner)
            await tx.commit()
        return released


def _identity(record: KeyRecord) -> KeyIdentity:
    return (record.scope, record.operation, record.key)


def same_outcome(a: object, b: object) -> bool:
    """Two reads of an outcome agree (refusals are new exception objects each time)."""
    if isinstance(a, ReportableError) and isinstance(b, ReportableError):
        return (type(a), a.message, a.metadata) == (type(b), b.message, b.metadata)
    return a == b


def _finished(record: KeyRecord, answer: StoredAnswer) -> KeyRecord:
    return replace(
        record,
        recovery_point=RecoveryPoint.FINISHED,
        response_code=answer.code,
        response_body=answer.body,
        locked_by=None,
        locked_at=None,
    )


class Checkpoint:
    """One keyed execution as the use case sees it: where to resume, and how to record
    progress inside the use case's own transactions. The transport reads back only
    `answer`: what the execution stored as the key's final answer, if anything."""

    def __init__(
        self,
        record: KeyRecord | None,
        encode: Callable[[Any], bytes],
        encode_refusal: Callable[[ReportableError], StoredAnswer],
        claim_with: IdempotencyKeys | None = None,
        answers: FinalAnswers | None = None,
    ) -> None:
        """`claim_with`: the key (`record`, from `IdempotencyKeys.unclaimed`) is not
        claimed yet; the execution's first write claims it (`claiming`), or `claim`.
        `answers`: where the final answer is kept once its transaction committed."""
        self._record = record
        self._encode = encode
        self._encode_refusal = encode_refusal
        self._answer: StoredAnswer | None = None
        self._claim_with = claim_with if record is not None else None
        self._answers = answers

    @property
    def claimed(self) -> bool:
        """False while the key is still to be claimed: nothing ran under it yet (or the
        claiming write's COMMIT did not answer: `IdempotencyKeys.begin` finds out)."""
        return self._claim_with is None

    @property
    def answer(self) -> StoredAnswer | None:
        """The final answer this execution stored; None while the key is left open (the
        outcome is pending) or for an execution without a key."""
        return self._answer

    @property
    def record(self) -> KeyRecord | None:
        """The key's record as this execution holds it (from its claim and progress)."""
        return self._record

    @property
    def payment_id(self) -> str | None:
        return self._record.payment_id if self._record else None

    @property
    def refund_id(self) -> str | None:
        return self._record.refund_id if self._record else None

    def resumes_at(self, point: RecoveryPoint) -> bool:
        return self._record is not None and self._record.recovery_point is point

    def answer_for(self, outcome: object) -> StoredAnswer | None:
        """The key's answer for an outcome (a result, or a refusal), encoded now: call it
        before the transaction that stores it, never under its write lock. None without
        a key (nothing is encoded then)."""
        if self._record is None:
            return None
        if isinstance(outcome, ReportableError):
            return self._encode_refusal(outcome)
        return StoredAnswer(0, self._encode(outcome))

    def reaching(
        self, point: RecoveryPoint, *, payment_id: str | None = None, refund_id: str | None = None
    ) -> Mark:
        """The mark that records progress to `point` in a use case's transaction."""

        async def reach(tx: UnitOfWork) -> None:
            if self._record is not None:
                progressed = replace(
                    self._record,
                    recovery_point=point,
                    payment_id=payment_id or self._record.payment_id,
                    refund_id=refund_id or self._record.refund_id,
                )
                await self._stage(tx, progressed, None, progress_only=True)

        return reach

    def claiming(
        self, point: RecoveryPoint, *, payment_id: str | None = None, refund_id: str | None = None
    ) -> Mark:
        """The mark of the execution's first write: `reaching(point)` for a claimed key;
        for a key still to be claimed, the claim itself, inserted at `point`. Run it first
        in its transaction (see `IdempotencyKeys.claim_in`); it raises KeyDecided if the
        key is there already."""
        keys, record = self._claim_with, self._record
        if keys is None or record is None:
            return self.reaching(point, payment_id=payment_id, refund_id=refund_id)
        progressed = replace(
            record,
            recovery_point=point,
            payment_id=payment_id or record.payment_id,
            refund_id=refund_id or record.refund_id,
        )

        async def claim(tx: UnitOfWork) -> None:
            await keys.claim_in(tx, progressed)

            def committed() -> None:
                self._record = progressed
                self._claim_with = None

            tx.on_commit(committed)

        return claim

    async def claim(self) -> None:
        """Claim a key still to be claimed now, in a transaction of its own (`begin`),
        for an execution that must not do something before its first write unless it
        holds the key (ask the order service again for a replay). Raises KeyDecided for
        a key there already that this execution does not take (a stored answer, a
        conflict); a key it takes to resume is its record from then on."""
        keys, record = self._claim_with, self._record
        if keys is None or record is None:
            return
        try:
            outcome = await keys.begin(
                record.scope, record.operation, record.key, record.fingerprint
            )
        except (IdempotencyKeyReused, IdempotencyKeyInUse) as conflict:
            raise KeyDecided(conflict) from None
        if isinstance(outcome, StoredAnswer):
            raise KeyDecided(outcome)
        self._record = outcome
        self._claim_with = None

    def finishing(self, answer: StoredAnswer | None) -> Mark:
        """The mark that stores `answer` (from answer_for) as the key's final answer, in
        the transaction of the final change: a crash before the caller hears it must not
        turn it into another answer."""

        async def finish(tx: UnitOfWork) -> None:
            if self._record is not None and answer is not None:
                await self._stage(tx, _finished(self._record, answer), answer)

        return finish

    async def _stage(
        self,
        tx: UnitOfWork,
        record: KeyRecord,
        answer: StoredAnswer | None,
        *,
        progress_only: bool = False,
    ) -> None:
        """Save `record` in `tx`; it becomes this checkpoint's state once `tx` commits.
        Progress leaves the lock columns alone: the lease is as its holder last renewed
        it, not as it was when the key was claimed."""
        if progress_only:
            await tx.idempotency.advance(record)
        else:
            await tx.idempotency.save(record)

        def committed() -> None:
            self._record = record
            if answer is not None:
                self._answer = answer
                if self._answers is not None:
                    self._answers.remember(record)

        tx.on_commit(committed)


async def untouched(tx: UnitOfWork) -> None:
    """The mark of a transaction that does not move the key."""


def no_checkpoint() -> Checkpoint:
    return Checkpoint(None, lambda _result: b"", lambda _refusal: StoredAnswer(0, b""))
