"""WORKERS > 1: that many server processes on one port (SO_REUSEPORT), supervised.

The supervisor (the `serve` process) migrates once, then starts one spawned process per
worker. Worker i serves with INSTANCE_ID `<INSTANCE_ID>-w<i>`: unique among the live
workers and the same after a restart of that worker, so a restarted worker releases
only its own predecessor's idempotency locks, never a live sibling's. A worker that dies
is restarted (same index); one that dies before it served stops them all (a bad
setting or a taken port would only crash again). SIGTERM/SIGINT go to every worker,
which drain like a single server; the supervisor exits when they have.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import signal
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

from payment_grpc.config import Settings

log = logging.getLogger("payment_grpc")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
CGROUP_CPU_MAX = pathlib.Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """Cores this process may use: the CPU affinity, capped by a cgroup v2 CPU quota
    (a Kubernetes CPU limit of 1500m gives 2)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, -(-int(quota) // int(period))))  # ceil


class WorkersConfigError(ValueError):
    """WORKERS that this database or port cannot have; the message is the one line shown."""


def worker_count(settings: Settings) -> int:
    """The number of server processes WORKERS asks for ("auto": one per core on
    PostgreSQL, 1 on SQLite). Raises WorkersConfigError for what cannot work."""
    sqlite, workers = settings.database.is_sqlite, settings.server.workers
    if workers == "auto":
        return 1 if sqlite else available_cores()
    if workers > 1 and sqlite:
        raise WorkersConfigError(
            f"WORKERS={workers} needs PostgreSQL: SQLite's status bus is in-process,"
            " so watchers on one worker would miss the others' changes (set WORKERS=1)"
        )
    if workers > 1 and settings.server.port == 0:
        raise WorkersConfigError(
            f"WORKERS={workers} needs a fixed PORT: with PORT=0 each worker would"
            " listen on a different random port"
        )
    return workers


def worker_settings(settings: Settings, index: int, count: int) -> Settings:
    """Worker `index`'s settings: its own INSTANCE_ID, WORKERS resolved (so the server
    binds with SO_REUSEPORT), no migration (the supervisor did it)."""
    metrics_port = settings.telemetry.metrics_port
    return settings.replace(
        {
            "INSTANCE_ID": f"{settings.server.instance_id}-w{index}",
            # Each worker serves its own metrics: METRICS_PORT + index (0: a free port).
            "METRICS_PORT": metrics_port and metrics_port + index,
            "WORKERS": count,
            "MIGRATE_ON_START": False,
        }
    )


def _end_with_supervisor(supervisor_pid: int) -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL, so no worker
    outlives it (an orphan would keep serving the port and holding its keys)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM still reaches us
        return
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _run_worker(settings: Settings, ready: Event, supervisor_pid: int) -> None:
    """Entry point of a spawned worker process."""
    from payment_grpc.cli import run_server
    from payment_grpc.logging_setup import configure_logging

    _end_with_supervisor(supervisor_pid)
    configure_logging(settings.log.level, settings.log.format)
    run_server(settings, on_ready=ready.set)


@dataclass(slots=True)
class _Worker:
    index: int
    process: BaseProcess
    ready: Event  # set once the worker serves


class Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
        self._count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._stopping = False

    def _start(self, index: int) -> None:
        ready = self._ctx.Event()
        settings = worker_settings(self._settings, index, self._count)
        process = self._ctx.Process(
            target=_run_worker,
            args=(settings, ready, os.getpid()),
            name=f"payment-grpc-worker-{index}",
        )
        process.start()
        self._workers[index] = _Worker(index, process, ready)

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers.values():
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signum)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stopping = True
        self._signal_all(signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for index in range(self._count):
            self._start(index)
        log.info("supervising %d workers", self._count, extra={"port": self._settings.server.port})
        exit_code = 0
        while self._workers:
            sentinels = {w.process.sentinel: w for w in self._workers.values()}
            for ready in multiprocessing.connection.wait(list(sentinels)):
                worker = sentinels[ready]  # type: ignore[index]
                worker.process.join()
                del self._workers[worker.index]
                exit_code = self._after_exit(worker) or exit_code
        return exit_code

    def _after_exit(self, worker: _Worker) -> int:
        """Restarts a worker that died while serving; returns a non-zero exit code when
        the whole server must stop."""
        code = worker.process.exitcode or 0
        if self._stopping:
            return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else 1
        if not worker.ready.is_set():
            log.error("worker %d exited with %s before serving: stopping", worker.index, code)
            self._stopping = True
            self._signal_all(signal.SIGTERM)
            return code if code > 0 else 1
        log.warning("worker %d exited with %s: restarting it", worker.index, code)
        self._start(worker.index)
        return 0
