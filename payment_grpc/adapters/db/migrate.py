"""Run the Alembic history (migrations/) against a database URL."""

from __future__ import annotations

import contextlib
import fcntl
import pathlib
from collections.abc import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url


def migrations_dir() -> pathlib.Path:
    package = pathlib.Path(__file__).resolve().parents[2]
    installed = package / "_migrations"  # wheel layout (see pyproject force-include)
    return installed if installed.is_dir() else package.parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["url"] = url
    return config


def upgrade(url: str) -> None:
    """Bring the schema to head. Synchronous: call it outside a running event loop.

    Replicas starting together queue: PostgreSQL on an advisory lock (migrations/env.py),
    SQLite on an exclusive flock of the database file (SQLite itself uses fcntl locks, so
    the two never interfere; Alembic commits SQLite DDL step by step, so BEGIN IMMEDIATE
    alone would let a second process run a step twice)."""
    with _sqlite_file_lock(url):
        command.upgrade(alembic_config(url), "head")


@contextlib.contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        yield
        return
    path = pathlib.Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:  # an empty file is an empty SQLite database
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
