"""The final answers a process keeps (service/final_answers.py): what a kept answer says to
a request, expiry, what is kept, and the bound (least recently used out first)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from payment_grpc.service.errors import IdempotencyKeyReused
from payment_grpc.service.final_answers import FinalAnswers
from payment_grpc.service.ports import KeyRecord, Operation, RecoveryPoint, StoredAnswer

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def finished(key: str, *, point: RecoveryPoint = RecoveryPoint.FINISHED) -> KeyRecord:
    return KeyRecord(
        record_id=f"idk_{key}",
        scope="svc",
        operation=Operation.CHARGE,
        key=key,
        fingerprint=f"fp-{key}",
        recovery_point=point,
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        response_code=0 if point is RecoveryPoint.FINISHED else None,
        response_body=f"body-{key}".encode() if point is RecoveryPoint.FINISHED else None,
    )


def test_the_same_request_gets_the_answer_another_is_reused() -> None:
    answers = FinalAnswers()
    answers.remember(finished("a"))
    assert answers.answer("svc", Operation.CHARGE, "a", "fp-a", NOW) == StoredAnswer(0, b"body-a")
    reused = answers.answer("svc", Operation.CHARGE, "a", "fp-other", NOW)
    assert isinstance(reused, IdempotencyKeyReused)
    assert answers.answer("other-caller", Operation.CHARGE, "a", "fp-a", NOW) is None
    assert answers.answer("svc", Operation.REFUND, "a", "fp-a", NOW) is None


def test_an_answer_at_its_expiry_is_dropped() -> None:
    answers = FinalAnswers()
    answers.remember(finished("a"))
    at_expiry = NOW + timedelta(hours=1)
    assert answers.answer("svc", Operation.CHARGE, "a", "fp-other", at_expiry) is None
    assert len(answers) == 0


def test_only_finished_keys_are_kept() -> None:
    answers = FinalAnswers()
    for point in RecoveryPoint:
        if point is not RecoveryPoint.FINISHED:
            answers.remember(finished(point.value, point=point))
    assert len(answers) == 0


def test_the_least_recently_used_answer_goes_first() -> None:
    answers = FinalAnswers(capacity=2)
    answers.remember(finished("a"))
    answers.remember(finished("b"))
    assert answers.answer("svc", Operation.CHARGE, "a", "fp-a", NOW) is not None  # used
    answers.remember(finished("c"))
    assert len(answers) == 2
    assert answers.answer("svc", Operation.CHARGE, "b", "fp-b", NOW) is None
    assert answers.answer("svc", Operation.CHARGE, "a", "fp-a", NOW) is not None
    for n in range(1000):
        answers.remember(finished(f"k{n}"))
    assert len(answers) == 2
