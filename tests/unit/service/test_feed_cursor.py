"""WatchPayments cursors: (tx, id) round trips; a cursor issued before the feed lost its
counter (pf1:<position>) still reads as (0, position); anything else is INVALID_CURSOR."""

from __future__ import annotations

import base64

import pytest

from payment_grpc.service.errors import InvalidCursor
from payment_grpc.service.feed import decode_cursor, encode_cursor
from payment_grpc.service.ports import FEED_START, FeedPosition


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "position", [FeedPosition(0, 1), FeedPosition(8_365, 42), FeedPosition(2**63 - 1, 2**63 - 1)]
)
def test_a_position_round_trips(position: FeedPosition) -> None:
    assert decode_cursor(encode_cursor(position)) == position


def test_an_empty_cursor_is_the_start() -> None:
    assert decode_cursor("") == FEED_START


def test_a_cursor_issued_before_the_upgrade_resumes_at_its_position() -> None:
    assert decode_cursor("cGYxOjM=") == FeedPosition(0, 3)  # what the old server sent for 3
    assert decode_cursor(cursor_of("pf1:1000000")) == FeedPosition(0, 1_000_000)


@pytest.mark.parametrize(
    "text",
    [
        "pf2:",
        "pf2:5",
        "pf2:.5",
        "pf2:5.",
        "pf2:-1.5",
        "pf2:1.2.3",
        "pf2:9223372036854775808.1",
        "pf1:",
        "pf1:x",
        "pf3:1.1",
        "pf2:\u0661.1",  # a non-ASCII digit
    ],
)
def test_anything_else_is_invalid(text: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor_of(text))
