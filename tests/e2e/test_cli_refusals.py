"""The real CLI refuses what it cannot run with: exit 2 and ONE line on stderr naming the
setting, never a traceback (issue 11 "Deployment safety", issue 13 "Starts and stops")."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from tests.helpers.credentials import TEST_ENCRYPTION_KEYS, TEST_JWT_SECRET

NOWHERE_PG = "postgresql://postgres@127.0.0.1:1/payments"  # nothing listens on port 1


def run_cli(cwd: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payment_grpc", *args],
        env={**os.environ, "DATA_DIR": str(cwd / "data"), "PORT": "0", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_refused(result: subprocess.CompletedProcess[str], setting: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("payment-grpc: ")
    assert setting in lines[0]
    return lines[0]


def sqlite_env(tmp_path: pathlib.Path) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'payments.db'}"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("GATEWAY_FAILURE_MIX", "declined"),
        ("GATEWAY_FAILURE_MIX", "refunds=3"),
        ("JWT_ALGORITHMS", "none"),
        ("DATABASE_URL", "mysql://db/payments"),
        ("LOG_LEVEL", "chatty"),
        ("GC_OLDEST_THRESHOLD", "-1"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_it(
    name: str, value: str, tmp_path: pathlib.Path
) -> None:
    settings = {**sqlite_env(tmp_path), name: value}
    line = assert_refused(run_cli(tmp_path, "serve", **settings), name)
    assert "invalid setting" in line


def test_an_algorithm_without_keys_refuses_to_start(tmp_path: pathlib.Path) -> None:
    result = run_cli(tmp_path, "serve", **sqlite_env(tmp_path), JWT_ALGORITHMS="RS256")
    assert "JWT_JWKS_FILE or AUTH_SERVICE_ADDR" in assert_refused(result, "JWT_ALGORITHMS")


def test_a_retired_setting_refuses_to_start_naming_its_replacement(
    tmp_path: pathlib.Path,
) -> None:
    """A variable the service no longer reads is not ignored in silence: an operator who
    set the old 60 s key lock would otherwise believe it still applied."""
    env = {**sqlite_env(tmp_path), "IDEMPOTENCY_LOCK_TIMEOUT_SECONDS": "60"}
    line = assert_refused(run_cli(tmp_path, "serve", **env), "IDEMPOTENCY_LOCK_TIMEOUT_SECONDS")
    assert "IDEMPOTENCY_LEASE_SECONDS" in line


def test_postgres_needs_shared_encryption_keys(tmp_path: pathlib.Path) -> None:
    result = run_cli(tmp_path, "serve", DATABASE_URL=NOWHERE_PG, JWT_SECRET_KEY=TEST_JWT_SECRET)
    assert_refused(result, "ENCRYPTION_KEYS")


def test_postgres_needs_a_configured_jwt_key(tmp_path: pathlib.Path) -> None:
    result = run_cli(
        tmp_path, "serve", DATABASE_URL=NOWHERE_PG, ENCRYPTION_KEYS=TEST_ENCRYPTION_KEYS
    )
    assert_refused(result, "JWT_SECRET_KEY")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_port_in_use_is_one_line(busy_port: int, tmp_path: pathlib.Path) -> None:
    result = run_cli(
        tmp_path, "serve", **sqlite_env(tmp_path), HOST="127.0.0.1", PORT=str(busy_port)
    )
    assert "in use" in assert_refused(result, "PORT")


def test_a_missing_sqlite_directory_is_one_line(tmp_path: pathlib.Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'payments.db'}"
    assert_refused(run_cli(tmp_path, "serve", DATABASE_URL=url), "DATABASE_URL")


def test_a_missing_postgres_database_is_one_line(postgres_url: str, tmp_path: pathlib.Path) -> None:
    missing = make_url(postgres_url).set(database="payment_grpc_no_such_database")
    result = run_cli(
        tmp_path,
        "serve",
        DATABASE_URL=missing.render_as_string(hide_password=False),
        ENCRYPTION_KEYS=TEST_ENCRYPTION_KEYS,
        JWT_SECRET_KEY=TEST_JWT_SECRET,
    )
    assert "does not exist" in assert_refused(result, "DATABASE_URL")


def test_an_unreachable_postgres_is_waited_for_then_one_line(tmp_path: pathlib.Path) -> None:
    result = run_cli(
        tmp_path,
        "migrate",
        DATABASE_URL=NOWHERE_PG,
        DATABASE_WAIT_SECONDS="1",
        LOG_FORMAT="text",
    )
    *attempts, last = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert attempts, "each attempt logs one line"
    assert all("database unreachable (attempt" in line for line in attempts), result.stderr
    assert last.startswith("payment-grpc: DATABASE_URL: cannot connect")
    assert "Traceback" not in result.stderr


def test_token_outside_the_data_dir_makes_no_new_secret(tmp_path: pathlib.Path) -> None:
    result = run_cli(tmp_path, "token", **sqlite_env(tmp_path))
    assert "no JWT secret" in assert_refused(result, "DATA_DIR")
    assert not (tmp_path / "data" / "jwt_secret").exists()


def test_version_and_help_for_every_command(tmp_path: pathlib.Path) -> None:
    version = run_cli(tmp_path, "--version")
    assert version.returncode == 0
    assert version.stdout.startswith("payment-grpc ")
    for command in ("serve", "migrate", "probe", "token", "rotate-keys"):
        helped = run_cli(tmp_path, command, "--help")
        assert helped.returncode == 0, helped.stderr
        assert f"usage: payment-grpc {command}" in helped.stdout
