"""Run the Alembic history (migrations/) against a database URL."""

from __future__ import annotations

import pathlib

from alembic import command
from alembic.config import Config


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
    """Bring the schema to head. Synchronous: call it outside a running event loop."""
    command.upgrade(alembic_config(url), "head")
