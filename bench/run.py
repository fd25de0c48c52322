"""`python -m bench.run`: start the server on a fresh database, load it, report.

For each (db, scenario): a fresh database, a server subprocess on a free 127.0.0.1
port (gateway latency 0, success rate 1.0), `--processes` spawn workers with
`--concurrency` coroutines each, a warm-up excluded from the stats, then SIGTERM.
Prints one markdown row per run and writes JSON to bench/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import pathlib
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from bench.scenarios import SCENARIOS
from bench.server import (
    STOP_TIMEOUT_S,
    RunningServer,
    ServerSecrets,
    fresh_database,
    machine_busy_seconds,
    running_server,
)
from bench.stats import (
    TABLE_HEADER,
    RunInfo,
    Summary,
    cpu_split,
    markdown_row,
    summarize,
    to_json,
)
from bench.worker import BARRIER_TIMEOUT_S, CALL_TIMEOUT_S, WorkerConfig, WorkerResult, run_worker

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
DBS = ("sqlite", "postgresql")
COLLECT_SLACK_S = 60.0
POLL_S = 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--db", choices=[*DBS, "both"], default="both")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="charge")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds excluded from stats")
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=32, help="in-flight calls per process")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.processes < 1 or args.concurrency < 1:
        parser.error("duration > 0, warmup >= 0, processes >= 1 and concurrency >= 1")
    return args


def _collect(results: Any, workers: Sequence[BaseProcess], timeout_s: float) -> list[WorkerResult]:
    """One result per worker; a worker that died without one becomes a failed result."""
    deadline = time.monotonic() + timeout_s
    collected: list[WorkerResult] = []
    while len(collected) < len(workers) and time.monotonic() < deadline:
        try:
            collected.append(results.get(timeout=POLL_S))
        except queue.Empty:
            if not any(worker.is_alive() for worker in workers) and results.empty():
                break
    missing = len(workers) - len(collected)
    codes = [worker.exitcode for worker in workers]
    collected += [WorkerResult(error=f"no result from a worker (exit codes {codes})")] * missing
    return collected


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall_s: float
    server_s: float
    machine_s: float

    @classmethod
    def take(cls, server: RunningServer) -> CpuSample:
        return cls(time.monotonic(), server.cpu_seconds(), machine_busy_seconds())

    def since(self, start: CpuSample) -> CpuSample:
        return CpuSample(
            self.wall_s - start.wall_s,
            self.server_s - start.server_s,
            self.machine_s - start.machine_s,
        )


def run_load(
    config: WorkerConfig, processes: int, server: RunningServer
) -> tuple[list[WorkerResult], CpuSample]:
    """Runs the workers; returns their results and the CPU used from their start on."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [
        ctx.Process(target=run_worker, args=(config, barrier, results), daemon=True)
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed; its result says why
        barrier.wait(BARRIER_TIMEOUT_S)
    start = CpuSample.take(server)
    limit = config.warmup_s + config.duration_s + CALL_TIMEOUT_S + COLLECT_SLACK_S
    collected = _collect(results, workers, limit)
    used = CpuSample.take(server).since(start)
    for worker in workers:
        worker.join(timeout=COLLECT_SLACK_S)
    return collected, used


def run_one(info: RunInfo, run_tag: str) -> Summary:
    with tempfile.TemporaryDirectory(prefix="payment-grpc-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        run_secrets = ServerSecrets.generate()
        with (
            fresh_database(info.db, workdir) as url,
            running_server(url, workdir, run_secrets) as server,
        ):
            config = WorkerConfig(
                server.target,
                info.scenario,
                info.concurrency,
                info.warmup_s,
                info.duration_s,
                run_tag,
                run_secrets.jwt_secret,
            )
            results, used = run_load(config, info.processes, server)
            summary = summarize(info, results, used.server_s, used.wall_s)
            summary.machine_busy_cpu_s = used.machine_s
        summary.server_exit_code = server.exit_code
        summary.server_killed = server.killed
        summary.server_log = server.log_messages()
        errors = any(not message.startswith("WARNING") for message in summary.server_log)
        if errors or server.killed:
            summary.server_log_file = str(_keep_log(server.log_path, info, run_tag))
        return summary


def _keep_log(log_path: pathlib.Path, info: RunInfo, run_tag: str) -> pathlib.Path:
    """Copies a server log with ERROR lines (or of a killed server) next to the JSON."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kept = RESULTS_DIR / f"server-{info.db}-{info.scenario}-{run_tag}.log"
    shutil.copyfile(log_path, kept)
    return kept


def _write_json(args: argparse.Namespace, summaries: list[Summary], started: str) -> pathlib.Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{started}.json"
    document = {
        "started_at": started,
        "machine": {"cpus": os.cpu_count(), "python": sys.version, "platform": platform.platform()},
        "args": vars(args),
        "runs": [to_json(s) for s in summaries],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def _report_problems(summary: Summary) -> None:
    print(f"  CPU (cores busy on average): {cpu_split(summary)}", file=sys.stderr)
    if summary.replayed:
        print(f"  answers marked idempotent-replayed: {summary.replayed}", file=sys.stderr)
    warmup_errors = {code: n for code, n in summary.warmup_codes.items() if code != "OK"}
    if warmup_errors:
        print(f"  errors during warm-up (not in the row): {warmup_errors}", file=sys.stderr)
    for message, count in summary.error_messages.items():
        print(f"  error x{count}: {message}", file=sys.stderr)
    for failure in summary.worker_failures:
        print(f"  worker failed: {failure}", file=sys.stderr)
    for message, count in summary.server_log.items():
        print(f"  server log x{count}: {message}", file=sys.stderr)
    if summary.server_log_file:
        print(f"  server log with errors kept at {summary.server_log_file}", file=sys.stderr)
    if summary.server_killed:
        print(
            f"  server still running {STOP_TIMEOUT_S:.0f}s after SIGTERM: killed", file=sys.stderr
        )
    elif summary.server_exit_code not in (0, None):
        print(f"  server exit code: {summary.server_exit_code}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    dbs = DBS if args.db == "both" else (args.db,)
    scenarios = tuple(SCENARIOS) if args.scenario == "all" else (args.scenario,)
    summaries: list[Summary] = []
    print(TABLE_HEADER, flush=True)
    for db in dbs:
        for scenario in scenarios:
            info = RunInfo(
                db, scenario, args.processes, args.concurrency, args.duration, args.warmup
            )
            summaries.append(run_one(info, uuid.uuid4().hex[:12]))
            print(markdown_row(summaries[-1]), flush=True)
            _report_problems(summaries[-1])
    print(f"\nJSON: {_write_json(args, summaries, started)}", flush=True)
    return 1 if any(s.worker_failures for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
