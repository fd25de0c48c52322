"""Merge worker results into one summary; render it as a markdown row and as JSON."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.worker import WorkerResult

TABLE_HEADER = (
    "| db | scenario | procs x conc | calls | rps | x ceiling | p50 ms | p99 ms "
    "| errors | distinct payments | server CPU ms/call | server CPU (1 core = 100%) "
    "| server RSS MB start -> end |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
)


@dataclass(frozen=True, slots=True)
class RunInfo:
    db: str
    scenario: str
    processes: int
    concurrency: int
    duration_s: float
    warmup_s: float
    workers: int = 1


@dataclass(slots=True)
class Summary:
    info: RunInfo
    calls: int
    ok: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    statuses: dict[str, int]
    distinct_payment_ids: int
    replayed: int
    warmup_codes: dict[str, int]
    error_messages: dict[str, int]
    server_cpu_s: float
    loadgen_cpu_s: float
    load_wall_s: float
    machine_busy_cpu_s: float = 0.0
    # The yardstick: the ceiling's rps for this RPC and client in the same bench run, or
    # (for a scenario the ceiling does not fit) the scenario's own ideal rps.
    ceiling_rps: float | None = None
    ideal_rps: float | None = None
    rss_start_bytes: int = 0
    rss_end_bytes: int = 0
    server_exit_code: int | None = None
    server_killed: bool = False
    server_log: dict[str, int] = field(default_factory=dict)
    server_log_file: str = ""
    worker_failures: list[str] = field(default_factory=list)
    # charge-events: one line per sink (bench/collaborators.py, OutboxLag.line)
    outbox_lag: list[str] = field(default_factory=list)
    # charge-stripe: CPU of the gateway simulator's process (not in server_cpu_s)
    neighbour_cpu_s: float = 0.0
    # (seconds since the load started, server RSS bytes), every RSS_SAMPLE_S: a soak's curve
    rss_samples: list[tuple[float, int]] = field(default_factory=list)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(
    info: RunInfo, results: Sequence[WorkerResult], server_cpu_s: float, load_wall_s: float
) -> Summary:
    latencies = sorted(x for r in results for x in r.latencies_ms)
    codes: Counter[str] = sum((r.codes for r in results), Counter())
    calls = sum(codes.values())
    return Summary(
        info=info,
        calls=calls,
        ok=codes["OK"],
        rps=calls / info.duration_s,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] if latencies else math.nan,
        errors={code: n for code, n in sorted(codes.items()) if code != "OK"},
        statuses=dict(sum((r.statuses for r in results), Counter())),
        distinct_payment_ids=len(set().union(*(r.payment_ids for r in results))),
        replayed=sum(r.replayed for r in results),
        warmup_codes=dict(sum((r.warmup_codes for r in results), Counter())),
        error_messages=dict(sum((r.messages for r in results), Counter()).most_common(10)),
        server_cpu_s=server_cpu_s,
        loadgen_cpu_s=sum(r.cpu_s for r in results),
        load_wall_s=load_wall_s,
        worker_failures=[r.error for r in results if r.error],
    )


def _errors_cell(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in errors.items()) or "0"


def ratio_cell(s: Summary) -> str:
    if s.ceiling_rps:
        return f"{s.rps / s.ceiling_rps:.3f}"
    if s.ideal_rps:
        return f"{s.rps / s.ideal_rps:.0%} of ideal {s.ideal_rps:.0f}"
    return "-"


def cpu_per_call_ms(s: Summary) -> float:
    """Server CPU over the whole load phase (warm-up included) per call made in it."""
    total_calls = s.calls + sum(s.warmup_codes.values())
    return s.server_cpu_s * 1000 / total_calls if total_calls else math.nan


def markdown_row(s: Summary) -> str:
    i = s.info
    cpu = s.server_cpu_s / s.load_wall_s if s.load_wall_s > 0 else math.nan
    cells = [
        i.db,
        i.scenario,
        f"{i.processes} x {i.concurrency}",
        str(s.calls),
        f"{s.rps:.0f}",
        ratio_cell(s),
        f"{s.p50_ms:.1f}",
        f"{s.p99_ms:.1f}",
        _errors_cell(s.errors),
        str(s.distinct_payment_ids),
        f"{cpu_per_call_ms(s):.2f}",
        f"{cpu:.0%}",
        f"{s.rss_start_bytes / 2**20:.0f} -> {s.rss_end_bytes / 2**20:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def cpu_split(s: Summary) -> str:
    """Where the machine's CPU went during the load phase, in cores busy on average."""
    wall = s.load_wall_s or math.nan
    known = s.server_cpu_s + s.loadgen_cpu_s + s.neighbour_cpu_s
    rest = max(0.0, s.machine_busy_cpu_s - known)
    neighbour = f" + gateway simulator {s.neighbour_cpu_s / wall:.2f}" if s.neighbour_cpu_s else ""
    return (
        f"machine {s.machine_busy_cpu_s / wall:.2f} = server {s.server_cpu_s / wall:.2f}"
        f" + load generator {s.loadgen_cpu_s / wall:.2f}{neighbour}"
        f" + everything else {rest / wall:.2f} (PostgreSQL, other processes)"
    )


def to_json(s: Summary) -> dict[str, Any]:
    return asdict(s)
