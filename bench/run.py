"""`python -m bench.run`: the ceiling, then the service on fresh databases; report.

First the bare grpc.aio ceiling (bench/ceiling.py, same process count as the service)
is driven by the same client for each RPC the scenarios call. Then for each (db,
scenario): a fresh database, a server subprocess on a free 127.0.0.1 port (gateway
latency 0, success rate 1.0), `--processes` spawn workers with `--concurrency`
coroutines each, a warm-up excluded from the stats, then SIGTERM. Prints one markdown
row per run, with rps as a fraction of the ceiling's, and writes JSON to
bench/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from bench.collaborators import (
    NATS_URL,
    Neighbour,
    delete_stream,
    order_service_stub,
    outbox_lag,
    stripe_simulator,
)
from bench.scenarios import SCENARIOS, Scenario, ideal_rps
from bench.server import (
    STOP_TIMEOUT_S,
    RunningServer,
    ServerSecrets,
    free_port,
    fresh_database,
    machine_busy_seconds,
    running_ceiling,
    running_server,
    tree_cpu_seconds,
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
from bench.streams import StreamsSummary, run_streams
from bench.worker import BARRIER_TIMEOUT_S, CALL_TIMEOUT_S, WorkerConfig, WorkerResult, run_worker

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
DBS = ("sqlite", "postgresql")
COLLECT_SLACK_S = 60.0
POLL_S = 1.0
SLOW_GATEWAY_IN_FLIGHT = 1000
RSS_SAMPLE_S = 60.0


@dataclass(frozen=True, slots=True)
class Profile:
    runs: tuple[tuple[str, str], ...]  # (db, scenario)
    duration_s: float
    warmup_s: float


PROFILES = {
    # `make bench`: a minute or two; every RPC once on PostgreSQL, Charge on SQLite
    "short": Profile(
        (
            ("postgresql", "charge"),
            ("postgresql", "get"),
            ("postgresql", "refund"),
            ("postgresql", "replay"),
            ("sqlite", "charge"),
        ),
        duration_s=5.0,
        warmup_s=1.0,
    ),
    # every scenario on PostgreSQL (the slow gateway with 1,000 in flight), Charge on SQLite
    "full": Profile(
        (
            *((("postgresql", name) for name in SCENARIOS)),
            ("sqlite", "charge"),
            ("sqlite", "replay"),
        ),
        duration_s=15.0,
        warmup_s=2.0,
    ),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--profile", choices=PROFILES, help="short (default; with --streams: no runs unless given)"
    )
    parser.add_argument("--db", choices=[*DBS, "both"], help="only runs on this database")
    parser.add_argument(
        "--scenario",
        choices=[*SCENARIOS, "all"],
        action="append",
        help="these runs instead of the profile's (repeatable)",
    )
    parser.add_argument("--duration", type=float, help="measured seconds (profile's default)")
    parser.add_argument("--warmup", type=float, help="seconds excluded from stats")
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=32, help="in-flight calls per process")
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="server processes (WORKERS) of the service and the ceiling; SQLite: always 1",
    )
    parser.add_argument(
        "--server-path",
        type=pathlib.Path,
        help="run the service from this source tree (e.g. `git archive` of an older commit)",
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip the ceiling runs")
    parser.add_argument(
        "--soak", type=float, metavar="SECONDS", help="one long Charge run on PostgreSQL: RSS"
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=0,
        metavar="N",
        help="also: N WatchPaymentStatus streams on one PostgreSQL server process (RSS, fan-out)",
    )
    parser.add_argument(
        "--stream-payments", type=int, default=100, help="payments the streams watch"
    )
    parser.add_argument(
        "--stream-capture-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="one capture every SECONDS (0: 10 at a time, a burst of events)",
    )
    args = parser.parse_args(argv)
    # `--streams N` alone measures the streams only; with --profile or --scenario, both.
    streams_only = args.streams and not (args.profile or args.scenario or args.soak)
    profile = PROFILES[args.profile or "short"]
    args.duration = args.soak or args.duration or profile.duration_s
    args.warmup = profile.warmup_s if args.warmup is None else args.warmup
    if args.duration <= 0 or args.warmup < 0 or args.processes < 1 or args.concurrency < 1:
        parser.error("duration > 0, warmup >= 0, processes >= 1 and concurrency >= 1")
    if args.workers < 1:
        parser.error("workers >= 1")
    args.runs = [] if streams_only else _runs(args, profile)
    return args


def _runs(args: argparse.Namespace, profile: Profile) -> list[tuple[str, str]]:
    if args.soak:
        return [("postgresql", "charge")]
    runs = list(profile.runs)
    if args.scenario:
        scenarios = tuple(SCENARIOS) if "all" in args.scenario else tuple(args.scenario)
        runs = [(db, name) for db in DBS for name in scenarios]
    if args.db and args.db != "both":
        runs = [(db, name) for db, name in runs if db == args.db]
    return runs


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


class RssSampler(threading.Thread):
    """The server's RSS every RSS_SAMPLE_S while the load runs (a soak's curve)."""

    def __init__(self, server: RunningServer) -> None:
        super().__init__(daemon=True)
        self._server = server
        self._stop_event = threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.wait(RSS_SAMPLE_S):
            self.samples.append((round(time.monotonic() - start), self._server.rss_bytes()))

    def stop(self) -> list[tuple[float, int]]:
        self._stop_event.set()
        self.join()
        return self.samples


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


def _measure(server: RunningServer, info: RunInfo, run_tag: str, jwt_secret: str) -> Summary:
    config = WorkerConfig(
        server.target,
        info.scenario,
        info.concurrency,
        info.warmup_s,
        info.duration_s,
        run_tag,
        jwt_secret,
    )
    rss_start = server.rss_bytes()
    sampler = RssSampler(server)
    sampler.start()
    results, used = run_load(config, info.processes, server)
    summary = summarize(info, results, used.server_s, used.wall_s)
    summary.machine_busy_cpu_s = used.machine_s
    summary.rss_start_bytes, summary.rss_end_bytes = rss_start, server.rss_bytes()
    summary.rss_samples = sampler.stop()
    return summary


def run_ceiling(info: RunInfo, run_tag: str) -> Summary:
    """The same client against the bare grpc.aio server with canned answers."""
    with tempfile.TemporaryDirectory(prefix="payment-grpc-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        with running_ceiling(workdir, workers=info.workers) as server:
            summary = _measure(server, info, run_tag, ServerSecrets.generate().jwt_secret)
        summary.server_exit_code = server.exit_code
        summary.server_killed = server.killed
        return summary


def _source_env(server_path: pathlib.Path | None) -> dict[str, str]:
    """PYTHONPATH that makes `python -m payment_grpc` import another source tree."""
    if server_path is None:
        return {}
    return {"PYTHONPATH": str(server_path.resolve())}


@contextlib.contextmanager
def _collaborators(
    scenario: Scenario, workdir: pathlib.Path, run_tag: str
) -> Iterator[dict[str, str]]:
    """The server settings for the scenario's order service stub and NATS stream."""
    if not scenario.collaborators:
        yield {}
        return
    stream = f"BENCH_{run_tag}"
    with order_service_stub(free_port(), workdir) as address:
        try:
            yield {
                "ORDER_SERVICE_ADDR": address,
                "NATS_URL": NATS_URL,
                "NATS_STREAM": stream,
                "NATS_SUBJECT_PREFIX": f"bench{run_tag}.payments.v1",
            }
        finally:
            delete_stream(stream)


@contextlib.contextmanager
def _gateway(scenario: Scenario, workdir: pathlib.Path) -> Iterator[Neighbour | None]:
    """The Stripe-compatible simulator process for a scenario that wants it."""
    if not scenario.stripe_simulator:
        yield None
        return
    with stripe_simulator(workdir) as simulator:
        yield simulator


def run_one(
    info: RunInfo, run_tag: str, scenario: Scenario, server_path: pathlib.Path | None = None
) -> Summary:
    with tempfile.TemporaryDirectory(prefix="payment-grpc-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        run_secrets = ServerSecrets.generate()
        with (
            fresh_database(info.db, workdir) as url,
            _collaborators(scenario, workdir, run_tag) as neighbours,
            _gateway(scenario, workdir) as gateway,
            running_server(
                url,
                workdir,
                run_secrets,
                workers=info.workers,
                extra_env=scenario.server_env
                | neighbours
                | (gateway.env if gateway else {})
                | _source_env(server_path),
            ) as server,
        ):
            gateway_cpu = tree_cpu_seconds(gateway.pid) if gateway else 0.0
            summary = _measure(server, info, run_tag, run_secrets.jwt_secret)
            if gateway:  # its CPU over the whole load (the workers' start included)
                summary.neighbour_cpu_s = tree_cpu_seconds(gateway.pid) - gateway_cpu
            if scenario.collaborators:
                summary.outbox_lag = [lag.line() for lag in outbox_lag(url)]
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


def _write_json(
    args: argparse.Namespace,
    summaries: list[Summary],
    started: str,
    streams: StreamsSummary | None,
) -> pathlib.Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{started}.json"
    document = {
        "started_at": started,
        "machine": {"cpus": os.cpu_count(), "python": sys.version, "platform": platform.platform()},
        "args": vars(args),
        "runs": [to_json(s) for s in summaries],
        "streams": dataclasses.asdict(streams) if streams else None,
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
    if summary.rss_samples:
        curve = ", ".join(f"{t:.0f}s {rss / 2**20:.0f}" for t, rss in summary.rss_samples)
        print(f"  server RSS MB every {RSS_SAMPLE_S:.0f} s: {curve}", file=sys.stderr)
    for line in summary.outbox_lag:
        print(f"  {line}", file=sys.stderr)
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


def _info(args: argparse.Namespace, db: str, name: str) -> RunInfo:
    concurrency = args.concurrency
    if not SCENARIOS[name].ceiling:  # the slow gateway: 1,000 calls in flight
        concurrency = max(1, SLOW_GATEWAY_IN_FLIGHT // args.processes)
    workers = 1 if db == "sqlite" else args.workers
    duration = args.duration
    return RunInfo(db, name, args.processes, concurrency, duration, args.warmup, workers)


def _canonical(rpc: str) -> str:
    """The first scenario calling `rpc`: what the ceiling is measured with for that RPC."""
    return next(name for name, s in SCENARIOS.items() if s.rpc == rpc and s.ceiling)


def _ceilings(args: argparse.Namespace) -> dict[tuple[str, int], Summary]:
    """One ceiling run per (RPC, server processes) the chosen runs need."""
    wanted = {
        (SCENARIOS[name].rpc, _info(args, db, name).workers)
        for db, name in args.runs
        if SCENARIOS[name].ceiling
    }
    ceilings: dict[tuple[str, int], Summary] = {}
    for rpc, workers in sorted(wanted):
        info = RunInfo(
            "ceiling",
            _canonical(rpc),
            args.processes,
            args.concurrency,
            args.duration,
            args.warmup,
            workers,
        )
        ceilings[rpc, workers] = _report(run_ceiling(info, uuid.uuid4().hex[:12]))
    return ceilings


def _report(summary: Summary) -> Summary:
    print(markdown_row(summary), flush=True)
    _report_problems(summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    print(TABLE_HEADER, flush=True)
    ceilings = {} if args.no_ceiling or args.soak else _ceilings(args)
    summaries = list(ceilings.values())
    for db, name in args.runs:
        info, scenario = _info(args, db, name), SCENARIOS[name]
        summary = run_one(info, uuid.uuid4().hex[:12], scenario, args.server_path)
        ceiling = ceilings.get((scenario.rpc, info.workers))
        summary.ceiling_rps = ceiling.rps if ceiling and scenario.ceiling else None
        summary.ideal_rps = ideal_rps(scenario, info.processes * info.concurrency)
        summaries.append(_report(summary))
    streams = _streams(args) if args.streams else None
    print(f"\nJSON: {_write_json(args, summaries, started, streams)}", flush=True)
    failed = streams is not None and bool(streams.failures)
    return 1 if failed or any(s.worker_failures for s in summaries) else 0


def _streams(args: argparse.Namespace) -> StreamsSummary:
    """N WatchPaymentStatus streams on one server process (WORKERS=1), PostgreSQL bus."""
    with tempfile.TemporaryDirectory(prefix="payment-grpc-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        run_secrets = ServerSecrets.generate()
        with (
            fresh_database("postgresql", workdir) as url,
            running_server(
                url, workdir, run_secrets, workers=1, extra_env=_source_env(args.server_path)
            ) as server,
        ):
            summary = run_streams(
                server,
                run_secrets.jwt_secret,
                args.streams,
                args.stream_payments,
                args.processes,
                args.stream_capture_interval,
            )
    print(summary.row(), flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
