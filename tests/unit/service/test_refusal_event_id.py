"""The dedupe id of the saga's `payment.failed` without a payment: derived from the
inventory event id, and short enough for the outbox's columns (64 characters)."""

from __future__ import annotations

from payment_grpc.service.outbox import refusal_event_id


def test_a_short_event_id_is_kept_whole() -> None:
    assert refusal_event_id("evt_123") == "inventory:evt_123:failed"


def test_a_long_event_id_is_replaced_by_its_digest_stably() -> None:
    long_id = "evt_" + "x" * 240
    first = refusal_event_id(long_id)
    assert first == refusal_event_id(long_id)
    assert first != refusal_event_id(long_id + "y")
    assert first.startswith("inventory:")
    assert first.endswith(":failed")
    assert len(first) <= 64
