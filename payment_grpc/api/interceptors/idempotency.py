"""Idempotency keys on the mutating RPCs (DESIGN.md "Idempotency").

Validates the `idempotency-key` metadata, fingerprints the request (SHA-256 of its
deterministic serialization), then claims the key, replays the stored answer, or rejects.
For a claimed key it builds the call's Checkpoint and publishes it read-only
(api/context.py) for the servicer to hand to the use case, which records progress and
stores the answer (service/idempotency.py). Afterwards the checkpoint's `answer` says
what was stored: this layer sends that answer, stores a business error nothing stored,
and gives the key back after retryable failures or while the outcome is pending.

A Charge's or a Refund's key is claimed by the use case's first write instead (README, "One
claim fewer per Charge", "A Refund's key claimed in its first transaction"): its
Checkpoint carries the unclaimed record. If that claim met the key
(KeyDecided) the key's answer or conflict is sent; if the call refused before its claim,
or the key is there to resume, the key is claimed here as for the other RPCs and the call
runs again under it.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc import aio

from payment_grpc.api.context import KeyedExecution, Response, current_execution, current_request
from payment_grpc.api.errors import abort_with, code_for
from payment_grpc.api.interceptors.observability import mark_replayed
from payment_grpc.api.interceptors.wrapping import (
    Handler,
    MethodInterceptor,
    Unary,
    unchanged,
    wrap_handler,
)
from payment_grpc.api.methods import split_method
from payment_grpc.api.responses import BUILDERS, OPERATIONS, refusal_answer
from payment_grpc.domain.errors import ReportableError
from payment_grpc.pan_masking import looks_like_card_number
from payment_grpc.service.errors import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    StorageUnavailable,
)
from payment_grpc.service.idempotency import Checkpoint, IdempotencyKeys, KeyDecided
from payment_grpc.service.limits import MAX_IDEMPOTENCY_KEY_LENGTH
from payment_grpc.service.ports import KeyRecord, Operation, StoredAnswer
from payment_grpc.telemetry.metrics import IDEMPOTENCY_CONFLICTS, IDEMPOTENCY_REPLAYS

HEADER = "idempotency-key"
REPLAYED = (("idempotent-replayed", "true"),)
# Retryable or caller-side failures are not the key's answer: a retry runs again.
NOT_STORED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INTERNAL,
    }
)


def valid_key(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidIdempotencyKey()
    if not all(" " <= ch <= "~" for ch in value):
        raise InvalidIdempotencyKey()
    if looks_like_card_number(value):  # the key is stored: no card number in it
        raise InvalidIdempotencyKey()
    return value


def fingerprint(method: str, request: Any) -> str:
    digest = hashlib.sha256(method.encode())
    digest.update(request.SerializeToString(deterministic=True))
    return digest.hexdigest()


@dataclass(frozen=True)
class _ReplayedStatus:
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


async def _replay(answer: StoredAnswer, context: aio.ServicerContext[Any, Any]) -> bytes:
    mark_replayed()
    if answer.code == 0:
        await context.send_initial_metadata(REPLAYED)
        return answer.body  # the exact bytes first sent; serialized as they are
    status = status_pb2.Status.FromString(answer.body)
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    await abort_with(
        context,
        _ReplayedStatus(  # type: ignore[arg-type]
            code, status.message, (("grpc-status-details-bin", answer.body), *REPLAYED)
        ),
    )
    raise AssertionError("unreachable")


class _Unclaimed(Exception):
    """An execution failed before its first write claimed its key: nothing ran under it."""


# Charge claims its key in the transaction that creates the payment, Refund in the one
# that inserts the refund (issue 12: two transactions per call); capture and cancel claim
# it in one of its own first.
CLAIMED_BY_FIRST_WRITE = frozenset({Operation.CHARGE, Operation.REFUND})


class IdempotencyInterceptor(MethodInterceptor):
    def __init__(self, keys: IdempotencyKeys) -> None:
        self._keys = keys

    def applies(self, details: grpc.HandlerCallDetails) -> bool:
        return details.method in OPERATIONS

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        method = details.method
        operation = OPERATIONS[method]
        rpc = dict(zip(("rpc.service", "rpc.method"), split_method(method), strict=True))
        raw_key = dict(details.invocation_metadata or ()).get(HEADER)

        def unary(behavior: Unary) -> Unary:
            async def keyed(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                key = valid_key(raw_key)
                scope = current_request.get().subject
                printed = fingerprint(method, request)
                try:
                    if operation in CLAIMED_BY_FIRST_WRITE:
                        try:
                            record = await self._keys.unclaimed(scope, operation, key, printed)
                            return await self._execute(record, behavior, request, context, True)
                        except KeyDecided as decided:
                            if isinstance(decided.found, StoredAnswer):
                                IDEMPOTENCY_REPLAYS.add(1, rpc)
                                return await _replay(decided.found, context)
                            if decided.found is not None:
                                raise decided.found from None
                        except _Unclaimed:
                            pass
                        # The key is there to resume, or the execution failed before its
                        # claim: claim it the usual way and run again (see README).
                    claimed = await self._keys.begin(scope, operation, key, printed)
                except (IdempotencyKeyReused, IdempotencyKeyInUse) as conflict:
                    IDEMPOTENCY_CONFLICTS.add(1, {**rpc, "reason": conflict.reason})
                    raise
                if isinstance(claimed, StoredAnswer):
                    IDEMPOTENCY_REPLAYS.add(1, rpc)
                    return await _replay(claimed, context)
                return await self._execute(claimed, behavior, request, context, False)

            return keyed

        return wrap_handler(handler, unary, unchanged, passthrough_bytes=True)

    async def _execute(
        self,
        record: KeyRecord,
        behavior: Unary,
        request: Any,
        context: aio.ServicerContext[Any, Any],
        claim_in_first_write: bool,
    ) -> Any:
        """Run the call under the key: claimed already, or (`claim_in_first_write`) to be
        claimed by the use case's first write. Raises KeyDecided when that claim met the
        key, and _Unclaimed when the call refused before it claimed the key."""
        response = Response(BUILDERS[record.operation])
        checkpoint = Checkpoint(
            record,
            response.encode,
            refusal_answer,
            claim_with=self._keys if claim_in_first_write else None,
            answers=self._keys.answers,
        )
        token = current_execution.set(KeyedExecution(checkpoint, response))
        try:
            answer = await behavior(request, context)
        except KeyDecided:
            raise  # the key was there: this execution wrote nothing, holds nothing
        except ReportableError as error:
            if not checkpoint.claimed:
                if isinstance(error, StorageUnavailable):
                    # Claimed now, it would wait for the database as long again: the
                    # caller retries (RetryInfo), and its retry finds the key if this
                    # write's COMMIT went through after all.
                    raise
                raise _Unclaimed() from error  # nothing ran under the key
            await asyncio.shield(self._after_error(_held(checkpoint, record), checkpoint, error))
            raise
        except BaseException:  # cancelled (deadline, client gone, shutdown) or a bug
            # Runs to its end even if cancelled again. A claim in a write whose COMMIT was
            # cut may have committed: released too if so (a row of another claim is not).
            await self._keys.release(_held(checkpoint, record))
            raise
        finally:
            current_execution.reset(token)
            self._keys.done(_held(checkpoint, record))
        stored = checkpoint.answer
        if stored is None:
            await self._keys.release(_held(checkpoint, record))  # outcome still pending
            return answer
        return stored.body  # the stored bytes: what a replay sends, serialized once

    async def _after_error(
        self, claimed: KeyRecord, checkpoint: Checkpoint, error: ReportableError
    ) -> None:
        if checkpoint.answer is not None:
            return  # the use case stored this refusal with its final change
        if code_for(error) in NOT_STORED:
            await self._keys.release(claimed)
            return
        await self._keys.store_answer(claimed, refusal_answer(error))


def _held(checkpoint: Checkpoint, claimed: KeyRecord) -> KeyRecord:
    """The key's record as the execution holds it now (a claim in its first write, or a
    resumed key taken by `Checkpoint.claim`, has its own record id)."""
    return checkpoint.record or claimed
