"""The real NATS JetStream for a test (127.0.0.1:4222, NATS_TEST_URL to move it): a stream
and subject prefix of the test's own, deleted after it. Unreachable: skipped, except under
CI=true, where it fails (CI must run the broker tests)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

NATS_URL = os.environ.get("NATS_TEST_URL", "nats://127.0.0.1:4222")
WAIT_S = 30


async def _quiet(error: Exception) -> None:
    """nats-py logs each failed connect with a traceback otherwise; the skip says why."""


@contextlib.asynccontextmanager
async def own_jetstream() -> AsyncIterator[tuple[JetStreamContext, str, str]]:
    """(JetStream, stream name, subject prefix), unique to the test and deleted after it."""
    try:
        # One try: nats-py's max_reconnect_attempts=0 means "for ever", which made an
        # unreachable broker hang the test instead of skipping it (or failing under CI).
        client = await nats.connect(
            NATS_URL, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=1,
            error_cb=_quiet,
        )  # fmt: skip
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"NATS must be reachable under CI=true: {exc}")
        pytest.skip(f"NATS not reachable: {exc}")
    suffix = uuid.uuid4().hex[:12]
    stream, prefix = f"PAYMENTS_T{suffix}", f"t{suffix}.payments.v1"
    js = client.jetstream()
    try:
        yield js, stream, prefix
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
        await client.close()


async def read_all(js: JetStreamContext, stream: str, subjects: str, count: int) -> list[Any]:
    """The first `count` messages of `stream` on `subjects` (ordered consumer)."""
    sub = await js.subscribe(subjects, stream=stream, ordered_consumer=True)
    try:
        return [await sub.next_msg(timeout=WAIT_S) for _ in range(count)]
    finally:
        await sub.unsubscribe()
