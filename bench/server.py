"""A fresh database and a `payment-grpc serve` subprocess on 127.0.0.1, for one run; or
the ceiling (`bench.ceiling`) on the same terms."""

from __future__ import annotations

import base64
import contextlib
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from payment_grpc.adapters.bus.postgres import libpq_dsn

HOST = "127.0.0.1"
PG_ADMIN_URL = os.environ.get(
    "BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# One database per bench process: two sessions benchmarking on one PostgreSQL at once
# would otherwise drop each other's database mid-run (DROP ... WITH (FORCE)).
PG_BENCH_DB = f"payment_grpc_bench_{os.getpid()}"
READY_TIMEOUT_S = 60.0
HEALTH_DEADLINE_S = 0.5
STOP_TIMEOUT_S = 30.0
LOG_LEVELS = ("WARNING", "ERROR", "CRITICAL")
MESSAGE_CHARS = 160
SERVER_ENV = {
    "HOST": HOST,
    "GATEWAY_LATENCY_MS_MIN": "0",
    "GATEWAY_LATENCY_MS_MAX": "0",
    "GATEWAY_SUCCESS_RATE": "1.0",
    "GATEWAY_SEED": "1",
    "LOG_LEVEL": "WARNING",
    "LOG_FORMAT": "text",
    "MIGRATE_ON_START": "true",
    "RATE_LIMIT_PER_SECOND": "0",  # measure the server, not the per-caller limiter
}


@dataclass(frozen=True, slots=True)
class ServerSecrets:
    """Throw-away secrets for one run: the HS256 JWT key and the column encryption key."""

    jwt_secret: str = field(repr=False)
    encryption_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> ServerSecrets:
        key = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        return cls(jwt_secret=secrets.token_urlsafe(32), encryption_key=key)

    def env(self) -> dict[str, str]:
        return {
            "JWT_SECRET_KEY": self.jwt_secret,
            "ENCRYPTION_KEYS": f"bench:{self.encryption_key}",
        }


@dataclass(slots=True)
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: pathlib.Path
    exit_code: int | None = None
    killed: bool = False  # still running STOP_TIMEOUT_S after SIGTERM

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def cpu_seconds(self) -> float:
        """utime + stime of the server and its worker processes (Linux /proc)."""
        return tree_cpu_seconds(self.process.pid)

    def rss_bytes(self) -> int:
        """Resident memory of the server and its worker processes (Linux /proc)."""
        pages = sum(stat.rss_pages for stat in _process_tree(self.process.pid))
        return pages * os.sysconf("SC_PAGE_SIZE")

    def log_messages(self, limit: int = 10) -> dict[str, int]:
        """The most frequent WARNING+ lines, keyed by 'LEVEL logger: message' (no time)."""
        counts: Counter[str] = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            words = line.split(maxsplit=3)
            if len(words) > 3 and words[2] in LOG_LEVELS:
                counts[f"{words[2]} {words[3][:MESSAGE_CHARS]}"] += 1
        return dict(counts.most_common(limit))


@dataclass(frozen=True, slots=True)
class _ProcStat:
    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime
    rss_pages: int


def _read_stat(path: pathlib.Path) -> _ProcStat | None:
    try:
        text = path.read_text()
    except OSError:  # gone meanwhile
        return None
    fields = text.rsplit(")", 1)[1].split()
    return _ProcStat(
        int(path.parent.name), int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21])
    )


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of the process `root` and its descendants (Linux /proc)."""
    return sum(stat.cpu_ticks for stat in _process_tree(root)) / os.sysconf("SC_CLK_TCK")


def _process_tree(root: int) -> list[_ProcStat]:
    """The process `root` and all its descendants (WORKERS > 1 forks server processes)."""
    stats = [s for p in pathlib.Path("/proc").glob("[0-9]*") if (s := _read_stat(p / "stat"))]
    children: dict[int, list[_ProcStat]] = {}
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
    tree = [s for s in stats if s.pid == root]
    for stat in tree:  # grows while iterating: breadth-first
        tree.extend(children.get(stat.pid, []))
    return tree


def machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used since boot (Linux /proc/stat)."""
    stat = pathlib.Path("/proc/stat")
    if not stat.exists():
        return 0.0
    ticks = [int(x) for x in stat.read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _recreate_postgres(name: str) -> str:
    with psycopg.connect(libpq_dsn(PG_ADMIN_URL), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_postgres(name: str) -> None:
    with psycopg.connect(libpq_dsn(PG_ADMIN_URL), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_database(db: str, workdir: pathlib.Path) -> Iterator[str]:
    """Yields a DATABASE_URL for an empty database (the server migrates it on start)."""
    if db == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir / 'payments.db'}"
        return
    url = _recreate_postgres(PG_BENCH_DB)
    try:
        yield url
    finally:
        _drop_postgres(PG_BENCH_DB)


def _is_serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_DEADLINE_S)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _wait_serving(server: RunningServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}: {_tail(server)}")
        if _is_serving(server.target):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server not SERVING after {READY_TIMEOUT_S}s: {_tail(server)}")


def _tail(server: RunningServer, lines: int = 20) -> str:
    return "\n".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])


def _stop(server: RunningServer) -> None:
    """SIGTERM, then wait; a server still running after STOP_TIMEOUT_S is killed."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        server.exit_code = server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.killed = True
        server.process.kill()
        server.exit_code = server.process.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_server(
    database_url: str,
    workdir: pathlib.Path,
    run_secrets: ServerSecrets,
    *,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Starts the service with WORKERS=workers, waits for SERVING, SIGTERMs it on exit."""
    env = {**os.environ, **SERVER_ENV, **run_secrets.env(), **(extra_env or {})}
    env |= {"DATABASE_URL": database_url, "WORKERS": str(workers)}
    env["DATA_DIR"] = str(workdir / "data")
    # Started in the run's directory: `python -m` puts the working directory first on
    # sys.path, so from a checkout it would import that tree, not --server-path's.
    command = [sys.executable, "-m", "payment_grpc", "serve"]
    with _started(command, env, workdir, cwd=workdir) as server:
        yield server


@contextlib.contextmanager
def running_ceiling(workdir: pathlib.Path, *, workers: int) -> Iterator[RunningServer]:
    """Starts the bare grpc.aio ceiling with `workers` processes on one port."""
    command = [sys.executable, "-m", "bench.ceiling", "--workers", str(workers)]
    with _started(command, dict(os.environ), workdir, port_flag=True) as server:
        yield server


@contextlib.contextmanager
def _started(
    command: list[str],
    env: dict[str, str],
    workdir: pathlib.Path,
    *,
    port_flag: bool = False,
    cwd: pathlib.Path | None = None,
) -> Iterator[RunningServer]:
    port = free_port()
    if port_flag:
        command = [*command, "--port", str(port)]
    env = {**env, "PORT": str(port)}
    log_path = workdir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    server = RunningServer(process, port, log_path)
    try:
        _wait_serving(server)
        yield server
    finally:
        _stop(server)
