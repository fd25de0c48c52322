"""A watcher that goes away while its events are being written costs one log line, not a
traceback (issue 13: "a watcher disconnecting mid-write logs an ExecuteBatchError
traceback")."""

from __future__ import annotations

import asyncio
import logging
import pathlib

import pytest
from payments.v1 import payment_service_pb2 as api

from tests.conftest import make_settings
from tests.helpers.builders import charge_request, keyed
from tests.helpers.servers import serving

WATCHERS = 5
CHARGES = 3  # each writes PENDING, PROCESSING and CAPTURED: a burst for every watcher
GONE = "WatchPayments watcher went away mid-write; the stream ends"


async def test_watchers_cancelling_mid_write_log_one_line_each(
    database_url: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(make_settings(database_url, tmp_path)) as (app, stub):
        feeds = [stub.WatchPayments(api.WatchPaymentsRequest()) for _ in range(WATCHERS)]
        # (each starts from the oldest event kept: it sees every charge, however late)

        async def first_then_gone(feed: object) -> None:
            async for _change in feed:  # type: ignore[attr-defined]
                feed.cancel()  # type: ignore[attr-defined]  # more are being written
                return

        watching = [asyncio.ensure_future(first_then_gone(feed)) for feed in feeds]
        for number in range(CHARGES):
            await stub.Charge(charge_request(), metadata=keyed(f"gone-{number}-{tmp_path.name}"))
        await asyncio.gather(*watching)
        await app.server.metrics.idle()  # every stream has ended on the server too

    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert noisy == [], [r.getMessage() for r in noisy]
    gone = [r for r in caplog.records if r.getMessage() == GONE]
    assert len(gone) <= WATCHERS
    assert all(r.levelno == logging.INFO for r in gone)
