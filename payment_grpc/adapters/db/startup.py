"""Before serving: the database answers, or the process says in one line why not.

An unreachable PostgreSQL (refused, timed out, starting up) is waited for with backoff,
one log line per attempt, for at most DATABASE_WAIT_SECONDS; an answer that will not change
by waiting (no such database, role or password) ends the wait at once.
"""

from __future__ import annotations

import logging
import pathlib

import psycopg
import tenacity
from sqlalchemy.engine import make_url

from payment_grpc.adapters.bus.postgres import libpq_dsn

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 3
# Answers from a running server that waiting will not change.
_PERMANENT = ("does not exist", "authentication failed", "pg_hba.conf", "permission denied")


class DatabaseUnavailable(Exception):
    """The database cannot be used; the message is one line naming DATABASE_URL."""


def wait_for_database(url: str, wait_s: float) -> None:
    if url.startswith("sqlite"):
        _sqlite_directory_exists(url)
        return
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_transient),
        stop=tenacity.stop_after_delay(wait_s),
        wait=tenacity.wait_exponential(multiplier=0.5, max=5),
        before_sleep=_log_attempt,
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                psycopg.connect(libpq_dsn(url), connect_timeout=CONNECT_TIMEOUT_S).close()
    except psycopg.OperationalError as exc:
        waited = f" (waited {wait_s:g}s)" if _transient(exc) and wait_s else ""
        raise DatabaseUnavailable(f"DATABASE_URL: cannot connect{waited}: {_reason(exc)}") from None


def _sqlite_directory_exists(url: str) -> None:
    database = make_url(url).database or ""
    if database and database != ":memory:":
        directory = pathlib.Path(database).resolve().parent
        if not directory.is_dir():
            raise DatabaseUnavailable(f"DATABASE_URL: directory {directory} does not exist")


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.OperationalError) and not any(
        marker in str(exc) for marker in _PERMANENT
    )


def _reason(exc: BaseException) -> str:
    """libpq's first line without its prefixes: 'database "x" does not exist'."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return line.rpartition(" failed: ")[2].removeprefix("FATAL:").strip()


def _log_attempt(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning(
        "database unreachable (attempt %d), retrying in %.1fs: %s",
        state.attempt_number,
        delay,
        _reason(exc) if exc else "",
    )
