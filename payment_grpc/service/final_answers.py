"""Final answers of idempotency keys, kept in this process (issue 12: a replay without a
database round trip).

A key's final answer (RecoveryPoint.FINISHED: a response code and body) never changes
until the key expires, so a copy answers a replay exactly as the database would: the same
answer for the same request, IDEMPOTENCY_KEY_REUSED for another one, and nothing (the
database decides: a new request) at or after the key's `expires_at`. Nothing that is not
FINISHED is kept. Bounded (least recently used first out): memory stays flat.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from payment_grpc.service.errors import IdempotencyKeyReused
from payment_grpc.service.ports import KeyRecord, Operation, RecoveryPoint, StoredAnswer

MAX_FINAL_ANSWERS = 10_000


@dataclass(frozen=True, slots=True)
class _Final:
    fingerprint: str
    answer: StoredAnswer
    expires_at: datetime


class FinalAnswers:
    def __init__(self, capacity: int = MAX_FINAL_ANSWERS) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, Operation, str], _Final] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def answer(
        self, scope: str, operation: Operation, key: str, fingerprint: str, now: datetime
    ) -> StoredAnswer | IdempotencyKeyReused | None:
        """What the key's stored final answer says to this request; None if not kept
        here (or expired: dropped, the database decides)."""
        identity = (scope, operation, key)
        final = self._entries.get(identity)
        if final is None:
            return None
        if final.expires_at <= now:
            del self._entries[identity]
            return None
        self._entries.move_to_end(identity)
        if final.fingerprint != fingerprint:
            return IdempotencyKeyReused()
        return final.answer

    def remember(self, record: KeyRecord) -> None:
        """Keep a committed FINISHED record's answer (anything else is ignored)."""
        if record.recovery_point is not RecoveryPoint.FINISHED or record.response_code is None:
            return
        identity = (record.scope, record.operation, record.key)
        answer = StoredAnswer(record.response_code, record.response_body or b"")
        self._entries[identity] = _Final(record.fingerprint, answer, record.expires_at)
        self._entries.move_to_end(identity)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
