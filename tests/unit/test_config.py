"""Settings: grouped in code, flat in the environment, parsed and checked at load time."""

from __future__ import annotations

import pathlib
import re

import pytest
from pydantic import ValidationError

from payment_grpc.config import FailureMix, Settings

README = pathlib.Path(__file__).parents[2] / "README.md"


def _env_names() -> set[str]:
    names = set()
    for info in Settings.model_fields.values():
        group = info.annotation
        assert isinstance(group, type)
        for field in group.model_fields.values():  # type: ignore[attr-defined]
            names.add(field.validation_alias)
    return names


def test_every_setting_is_read_from_the_variable_the_readme_documents() -> None:
    first_columns = re.findall(r"^\| (`[A-Z].*?) \|", README.read_text(), re.M)
    documented = {
        name for column in first_columns for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", column)
    }
    assert _env_names() == documented


def test_grouped_settings_read_flat_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PORT", "9001")
    monkeypatch.setenv("jwt_algorithms", " RS256 , ES256 ")
    monkeypatch.setenv("GATEWAY_FAILURE_MIX", "declined=1,network_error=0")
    monkeypatch.setenv("RATE_LIMIT_PER_SECOND", "0")
    settings = Settings()
    assert settings.server.port == 9001
    assert settings.jwt.algorithms == ["RS256", "ES256"]
    assert settings.gateway.failure_mix == FailureMix(declined=1, network_error=0)
    assert settings.rate_limit.per_second == 0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db:5432/pay", "postgresql+psycopg://u:p@db:5432/pay"),
        ("postgresql://u@db/pay", "postgresql+psycopg://u@db/pay"),
        ("postgresql+psycopg://u@db/pay", "postgresql+psycopg://u@db/pay"),
        ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
    ],
)
def test_database_urls_name_the_driver_we_run_on(given: str, expected: str) -> None:
    assert Settings.from_names({"DATABASE_URL": given}).database.url == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("GATEWAY_FAILURE_MIX", "declined"),
        ("GATEWAY_FAILURE_MIX", "refunded=5"),
        ("GATEWAY_FAILURE_MIX", "declined=-1"),
        ("GATEWAY_FAILURE_MIX", "declined=0,insufficient_funds=0,network_error=0,invalid_method=0"),
        ("JWT_ALGORITHMS", "none"),
        ("JWT_ALGORITHMS", ""),
        ("DATABASE_URL", "mysql://db/pay"),
        ("LOG_FORMAT", "xml"),
        ("GC_OLDEST_THRESHOLD", "0"),
        ("GC_OLDEST_THRESHOLD", "lots"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert str(caught.value.errors()[0]["loc"][0]) == name


def test_replace_validates_the_changed_group() -> None:
    settings = Settings.from_names({"PORT": 1})
    assert settings.replace({"port": 2}).server.port == 2
    with pytest.raises(ValidationError):
        settings.replace({"port": -1})
    with pytest.raises(KeyError, match="NO_SUCH_SETTING"):
        settings.replace({"no_such_setting": 1})
