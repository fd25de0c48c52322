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
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bench.scenarios import SCENARIOS
from bench.server import fresh_database, running_server
from bench.stats import TABLE_HEADER, RunInfo, Summary, markdown_row, summarize, to_json
from bench.worker import BARRIER_TIMEOUT_S, CALL_TIMEOUT_S, WorkerConfig, WorkerResult, run_worker

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
DBS = ("sqlite", "postgresql")
COLLECT_SLACK_S = 60.0


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


def _collect(results: Any, count: int, timeout_s: float) -> list[WorkerResult]:
    deadline = time.monotonic() + timeout_s
    return [results.get(timeout=max(0.0, deadline - time.monotonic())) for _ in range(count)]


def run_load(config: WorkerConfig, processes: int) -> tuple[list[WorkerResult], float]:
    """Runs the workers; returns their results and the wall time of the load phase."""
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
    started = time.monotonic()
    limit = config.warmup_s + config.duration_s + CALL_TIMEOUT_S + COLLECT_SLACK_S
    collected = _collect(results, processes, limit)
    elapsed = time.monotonic() - started
    for worker in workers:
        worker.join(timeout=COLLECT_SLACK_S)
    return collected, elapsed


def run_one(info: RunInfo, run_tag: str) -> Summary:
    with tempfile.TemporaryDirectory(prefix="payment-grpc-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        with fresh_database(info.db, workdir) as url, running_server(url, workdir) as server:
            config = WorkerConfig(
                server.target,
                info.scenario,
                info.concurrency,
                info.warmup_s,
                info.duration_s,
                run_tag,
            )
            cpu_before = server.cpu_seconds()
            results, wall_s = run_load(config, info.processes)
            summary = summarize(info, results, server.cpu_seconds() - cpu_before, wall_s)
        summary.server_exit_code = server.exit_code
        summary.server_log = server.log_messages()
        return summary


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
    for failure in summary.worker_failures:
        print(f"  worker failed: {failure}", file=sys.stderr)
    for message, count in summary.server_log.items():
        print(f"  server log x{count}: {message}", file=sys.stderr)
    if summary.server_exit_code not in (0, None):
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
