"""Expected conditions log one line at the right level, never a wall of tracebacks.

A database outage is expected: the recovery worker says once that it is paused (WARNING,
no traceback, however many passes fail) and once that it resumed (INFO).
"""

from __future__ import annotations

import logging
import pathlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy.engine import make_url

from payment_grpc.bootstrap import Application, build_application
from tests.conftest import make_settings
from tests.integration.test_health import TcpProxy

RECOVERY_LOGGER = "payment_grpc.service.recovery"
PASSES_DURING_OUTAGE = 4


@asynccontextmanager
async def database_outage(
    database_url: str, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[str, object]]:
    """(url the app should use, a switch): `switch.down()` / `switch.up()`.

    PostgreSQL goes away behind a proxy; SQLite cannot go away under open connections, so
    its outage is another process holding the writer lock (writes fail after the lock
    timeout, like a database that does not answer)."""
    if make_url(database_url).get_backend_name() == "postgresql":
        url = make_url(database_url)
        proxy = TcpProxy(url.port or 5432)
        await proxy.up()
        try:
            yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy
        finally:
            await proxy.down()
        return
    yield database_url, _WriterLock(make_url(database_url).database or "")


class _WriterLock:
    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    async def down(self) -> None:
        self._conn = sqlite3.connect(self._path, isolation_level=None)
        self._conn.execute("BEGIN IMMEDIATE")

    async def up(self) -> None:
        assert self._conn is not None
        self._conn.execute("ROLLBACK")
        self._conn.close()


def _lines(caplog: pytest.LogCaptureFixture, since: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records[since:] if r.name == RECOVERY_LOGGER]


async def test_recovery_during_a_database_outage_logs_one_line(
    database_url: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with database_outage(database_url, tmp_path) as (url, switch):
        settings = make_settings(
            url, tmp_path, recovery_interval_seconds=0.02, db_lock_timeout_seconds=0.1
        )
        app: Application = build_application(settings)
        await app.start()
        try:
            await app.recovery.wait_for_passes(app.recovery.completed_passes + 1)
            before = len(caplog.records)
            await switch.down()  # type: ignore[attr-defined]
            await app.recovery.wait_for_passes(app.recovery.completed_passes + PASSES_DURING_OUTAGE)
            during = _lines(caplog, before)
            await switch.up()  # type: ignore[attr-defined]
            after = len(caplog.records)
            await app.recovery.wait_for_passes(app.recovery.completed_passes + 2)
            resumed = _lines(caplog, after)
        finally:
            await app.stop()

    assert [r for r in caplog.records if r.exc_info] == [], "no traceback for an outage"
    assert [r.levelname for r in during] == ["WARNING"], [r.getMessage() for r in during]
    assert "paused" in during[0].getMessage()
    assert [r.levelname for r in resumed] == ["INFO"], [r.getMessage() for r in resumed]
    assert "resumed" in resumed[0].getMessage()
