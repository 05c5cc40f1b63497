"""Scaling-sweep arithmetic and output formats; pure (tests/unit/test_loadtests_report.py).

The sweep (loadtests/sweep/run.py) measures raw numbers per run: lookups and failures in a window,
its length, CPU-seconds of the node processes, Redis and PostgreSQL, a latency histogram, and the
node's tier counters. Everything derived here:

  throughput             lookups / wall seconds
  CPU per 1,000 lookups  CPU-seconds / lookups x 1000  (node, Redis, PostgreSQL separately)
  scaling efficiency     throughput(n) / (n / n0 x throughput(n0)), n0 = the smallest node count
  CPU linearity          cpu_per_1k(n) / cpu_per_1k(n0): 1.0 = perfectly linear, within +-10 % = LINEAR
  miss ratio             lookups that reached PostgreSQL / lookups the node resolved (crs_lookups_total)

On a machine where the load generator shares the cores with the service, wall throughput cannot
grow with nodes and the efficiency column says so ("client-bound"); the CPU cost per lookup is
what shows linear scaling there.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests.shared.arith import json_safe, safe_div

SCHEMA = "crs-sweep/1"
LINEAR_TOLERANCE = 0.10
PG_TIERS = ("l3", "l3_negative")       # crs_lookups_total tiers that were loads from PostgreSQL
SATURATED_UTIL = 0.85                  # node cores at least this busy = the nodes were the bottleneck


@dataclass
class RunResult:
    """One measured run: a configuration (nodes, shards) under one load (scenario mix)."""

    label: str                      # "sweep" or "calibrate:<scenario>" or "light"
    mix: str                        # the --crs-mix it ran
    nodes: int                      # node processes (crs serve --workers)
    shards: int                     # Redis shards in use
    node_cpus: int                  # cores the nodes were allowed on (pinning), 0 = unpinned
    locust_workers: int
    users: int
    wall_s: float
    lookups: int                    # keys answered as expected (expected NOT_FOUND / INVALID included)
    calls: int
    failures: int
    expected_errors: int
    latency_ms: dict[str, float]    # p50 / p95 / p99 / max / mean / n, per call
    node_cpu_s: float
    redis_cpu_s: float
    pg_cpu_s: float
    tiers: dict[str, int] = field(default_factory=dict)   # crs_lookups_total deltas in the window
    per_second: list[int] = field(default_factory=list)
    redis_keys: int = 0
    redis_bytes: int = 0            # used_memory above the empty shards' baseline, all shards in use
    failure_kinds: dict[str, int] = field(default_factory=dict)
    offered_calls_per_s: float = 0.0   # paced load (calls/s, all users); 0 = closed loop, as fast as possible

    # -- derived ---------------------------------------------------------------------------------
    @property
    def throughput(self) -> float:
        return safe_div(self.lookups, self.wall_s)

    @property
    def calls_per_s(self) -> float:
        return safe_div(self.calls, self.wall_s)

    @property
    def error_rate(self) -> float:
        return safe_div(self.failures, self.calls)

    @property
    def node_cpu_per_1k(self) -> float:
        """Node CPU-seconds per 1,000 lookups."""
        return safe_div(self.node_cpu_s * 1000, self.lookups)

    @property
    def redis_cpu_per_1k(self) -> float:
        return safe_div(self.redis_cpu_s * 1000, self.lookups)

    @property
    def pg_cpu_per_1k(self) -> float:
        return safe_div(self.pg_cpu_s * 1000, self.lookups)

    @property
    def node_cores_busy(self) -> float:
        return safe_div(self.node_cpu_s, self.wall_s)

    @property
    def node_util(self) -> float:
        """Busy fraction of the cores the nodes could use (min(nodes, pinned cores))."""
        cores = min(self.nodes, self.node_cpus) if self.node_cpus else self.nodes
        return safe_div(self.node_cores_busy, cores)

    @property
    def resolved(self) -> int:
        return sum(self.tiers.values())

    @property
    def miss_ratio(self) -> float:
        """Share of resolved lookups that were loaded from PostgreSQL."""
        return safe_div(sum(self.tiers.get(t, 0) for t in PG_TIERS), self.resolved)

    @property
    def l1_ratio(self) -> float:
        return safe_div(self.tiers.get("l1", 0), self.resolved)

    @property
    def redis_ops_per_lookup(self) -> float:
        """Lookups that went past the near-cache (each is one Redis GET, plus a SET on a miss)."""
        past_l1 = self.resolved - self.tiers.get("l1", 0) - self.tiers.get("coalesced", 0)
        misses = sum(self.tiers.get(t, 0) for t in PG_TIERS)
        return safe_div(past_l1 + misses, self.resolved)

    @property
    def bytes_per_key(self) -> float:
        return safe_div(self.redis_bytes, self.redis_keys)

    @property
    def saturated(self) -> bool:
        return not math.isnan(self.node_util) and self.node_util >= SATURATED_UTIL

    def derived(self) -> dict[str, float]:
        return {"throughput": self.throughput, "calls_per_s": self.calls_per_s, "error_rate": self.error_rate,
                "node_cpu_per_1k": self.node_cpu_per_1k, "redis_cpu_per_1k": self.redis_cpu_per_1k,
                "pg_cpu_per_1k": self.pg_cpu_per_1k, "node_cores_busy": self.node_cores_busy,
                "node_util": self.node_util, "miss_ratio": self.miss_ratio, "l1_ratio": self.l1_ratio,
                "redis_ops_per_lookup": self.redis_ops_per_lookup, "bytes_per_key": self.bytes_per_key}


def run_from_json(d: Mapping[str, Any]) -> RunResult:
    names = RunResult.__dataclass_fields__
    return RunResult(**{k: v for k, v in d.items() if k in names})


# -- across a sweep --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingRow:
    run: RunResult
    efficiency: float        # throughput(n) / (n/n0 x throughput(n0))
    cpu_ratio: float         # node_cpu_per_1k(n) / node_cpu_per_1k(n0)
    redis_cpu_ratio: float

    @property
    def linear(self) -> str:
        if math.isnan(self.cpu_ratio):
            return "N/A"
        return "LINEAR" if abs(self.cpu_ratio - 1) <= LINEAR_TOLERANCE else "NOT LINEAR"


def scaling(runs: Sequence[RunResult]) -> list[ScalingRow]:
    """Sweep runs in node order, each compared with the run of the smallest node count."""
    ordered = sorted(runs, key=lambda r: (r.nodes, r.shards))
    if not ordered:
        return []
    base = ordered[0]
    rows = []
    for r in ordered:
        ideal = base.throughput * r.nodes / base.nodes
        rows.append(ScalingRow(r, safe_div(r.throughput, ideal), safe_div(r.node_cpu_per_1k, base.node_cpu_per_1k),
                               safe_div(r.redis_cpu_per_1k, base.redis_cpu_per_1k)))
    return rows


def ideal_line(runs: Sequence[RunResult]) -> list[tuple[int, float]]:
    rows = scaling(runs)
    if not rows:
        return []
    base = rows[0].run
    return [(r.run.nodes, base.throughput * r.run.nodes / base.nodes) for r in rows]


def verdict(rows: Sequence[ScalingRow]) -> str:
    """One line on linearity: by CPU cost (always) and by wall throughput (only when saturated)."""
    if len(rows) < 2:
        return "one configuration only: nothing to compare"
    worst = max(rows, key=lambda r: abs(r.cpu_ratio - 1) if not math.isnan(r.cpu_ratio) else -1)
    cpu_ok = all(r.linear == "LINEAR" for r in rows)
    text = (f"node CPU per lookup stays within +-{100 * LINEAR_TOLERANCE:.0f}% of the {rows[0].run.nodes}-node "
            f"cost at every size (worst {worst.cpu_ratio:.2f}x at {worst.run.nodes} nodes): LINEAR"
            if cpu_ok else
            f"node CPU per lookup drifts beyond +-{100 * LINEAR_TOLERANCE:.0f}% (worst {worst.cpu_ratio:.2f}x at "
            f"{worst.run.nodes} nodes): NOT LINEAR")
    last = rows[-1]
    if all(r.run.offered_calls_per_s > 0 for r in rows):
        text += (f"; paced at the same load per node, {last.run.nodes} nodes answered {last.efficiency:.2f}x "
                 f"the ideal (n x the smallest size's lookups/s)")
    elif all(r.run.saturated for r in rows):
        text += f"; wall-clock efficiency at {last.run.nodes} nodes {last.efficiency:.2f}"
    else:
        text += ("; wall-clock efficiency is not meaningful here: the nodes were not saturated in every run "
                 "(the load generator shares the machine)")
    return text


# -- output ------------------------------------------------------------------------------------------
def _f(x: float, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _pct(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.{digits}f}%"


CSV_COLUMNS = ("label", "mix", "nodes", "shards", "locust_workers", "users", "offered_calls_per_s", "wall_s",
               "lookups", "calls", "failures", "expected_errors", "throughput", "efficiency", "error_rate", "p50_ms",
               "p95_ms",
               "p99_ms", "node_cpu_s", "redis_cpu_s", "pg_cpu_s", "node_cpu_per_1k", "redis_cpu_per_1k",
               "pg_cpu_per_1k", "cpu_ratio", "node_cores_busy", "node_util", "l1_ratio", "miss_ratio",
               "redis_ops_per_lookup", "bytes_per_key")


def to_csv(runs: Sequence[RunResult]) -> str:
    eff = {id(r.run): r for r in scaling([r for r in runs if r.label == "sweep"])}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in runs:
        row = eff.get(id(r))
        d = r.derived()
        values: dict[str, Any] = {**asdict(r), **d, "efficiency": row.efficiency if row else math.nan,
                                  "cpu_ratio": row.cpu_ratio if row else math.nan,
                                  "p50_ms": r.latency_ms.get("p50", math.nan),
                                  "p95_ms": r.latency_ms.get("p95", math.nan),
                                  "p99_ms": r.latency_ms.get("p99", math.nan)}
        w.writerow(["" if isinstance(values[c], float) and math.isnan(values[c]) else
                    (round(values[c], 6) if isinstance(values[c], float) else values[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def to_json(runs: Sequence[RunResult], machine: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    sweep = [r for r in runs if r.label == "sweep"]
    rows = {id(r.run): r for r in scaling(sweep)}
    out_runs = []
    for r in runs:
        d = asdict(r)
        d["derived"] = r.derived()
        if id(r) in rows:
            d["derived"].update(efficiency=rows[id(r)].efficiency, cpu_ratio=rows[id(r)].cpu_ratio,
                                redis_cpu_ratio=rows[id(r)].redis_cpu_ratio, linear=rows[id(r)].linear)
        out_runs.append(d)
    out: dict[str, Any] = json_safe({"schema": SCHEMA, "machine": dict(machine), "config": dict(config),
                                     "runs": out_runs, "verdict": verdict(list(rows.values()))})
    return out


def runs_from_report(report: Mapping[str, Any]) -> list[RunResult]:
    if report.get("schema") != SCHEMA:
        raise ValueError(f"not a sweep report (schema {report.get('schema')!r}, expected {SCHEMA!r})")

    def fix(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (math.nan if v is None else v) for k, v in d.items()}

    runs = []
    for d in report["runs"]:
        r = run_from_json(d)
        r.latency_ms = fix(r.latency_ms)
        runs.append(r)
    return runs


def markdown(runs: Sequence[RunResult], machine: Mapping[str, Any], config: Mapping[str, Any],
             plot_name: str | None = "throughput.png") -> str:
    sweep = [r for r in runs if r.label == "sweep"]
    rows = scaling(sweep)
    md = ["# CRS Lookup scaling sweep", ""]
    md.append(f"Generated by `python -m loadtests.sweep` on {machine.get('date', '?')} on "
              f"**{machine.get('name', '?')}** "
              f"({machine.get('cores', '?')} cores, {machine.get('cpu_model', '?')}). Raw numbers: "
              "[sweep.json](sweep.json), [sweep.csv](sweep.csv). Method: [docs/loadtests.md](../../loadtests.md).")
    md += ["", f"**Verdict:** {verdict(rows)}.", ""]
    if plot_name:
        md += [f"![throughput vs nodes]({plot_name})", ""]
    md += ["## Scaling (scenario mix: `" + (sweep[0].mix if sweep else "-") + "`)", "",
           "| nodes | shards | lookups/s | efficiency | p50 ms | p95 ms | p99 ms | errors | node CPU-s / 1k lookups "
           "| vs smallest | Redis CPU-s / 1k | PG CPU-s / 1k | node cores busy | near-cache hits | PG loads |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        r = row.run
        md.append(f"| {r.nodes} | {r.shards} | {_f(r.throughput)} | {_f(row.efficiency, 2)} | "
                  f"{_f(r.latency_ms.get('p50', math.nan), 2)} | {_f(r.latency_ms.get('p95', math.nan), 2)} | "
                  f"{_f(r.latency_ms.get('p99', math.nan), 2)} | {_pct(r.error_rate, 2)} | "
                  f"{_f(r.node_cpu_per_1k, 3)} | "
                  f"{_f(row.cpu_ratio, 2)}x {row.linear} | {_f(r.redis_cpu_per_1k, 3)} | {_f(r.pg_cpu_per_1k, 3)} | "
                  f"{_f(r.node_cores_busy, 2)} | {_pct(r.l1_ratio)} | {_pct(r.miss_ratio, 2)} |")
    md += ["", "Efficiency = throughput(n) / (n / n0 x throughput(n0)), n0 the smallest node count. CPU-s / 1k "
           "lookups = CPU-seconds of those processes in the window / lookups x 1000 (linear scaling keeps the node "
           f"figure within +-{100 * LINEAR_TOLERANCE:.0f}% of the smallest size's). Lookups are keys answered as "
           "expected (a BatchResolve of 200 keys is 200; expected NOT_FOUND / INVALID_ARGUMENT answers count); "
           "latency is per call, measured by the load generator, queueing included."]
    cal = [r for r in runs if r.label.startswith("calibrate:")]
    if cal:
        md += ["", "## Per-scenario cost (one configuration, each scenario alone)", "",
               "The capacity model (`crs-load capacity`) weighs these by the planner's mix.", "",
               "| scenario | nodes | lookups/s | calls/s | p99 ms | node CPU-s / 1k | Redis CPU-s / 1k "
               "| PG CPU-s / 1k | near-cache hits | PG loads | Redis B/key |",
               "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in cal:
            md.append(f"| {r.label.split(':', 1)[1]} | {r.nodes} | {_f(r.throughput)} | {_f(r.calls_per_s)} | "
                      f"{_f(r.latency_ms.get('p99', math.nan), 2)} | {_f(r.node_cpu_per_1k, 3)} | "
                      f"{_f(r.redis_cpu_per_1k, 3)} | {_f(r.pg_cpu_per_1k, 3)} | {_pct(r.l1_ratio)} | "
                      f"{_pct(r.miss_ratio, 2)} | {_f(r.bytes_per_key)} |")
    light = [r for r in runs if r.label == "light"]
    if light:
        r = light[0]
        md += ["", f"Light load ({r.users} users, {_f(r.calls_per_s)} calls/s, mix `{r.mix}`): p50 "
               f"{_f(r.latency_ms.get('p50', math.nan), 2)} ms, p99 {_f(r.latency_ms.get('p99', math.nan), 2)} ms "
               "(the service time the capacity model's latency rule starts from)."]
    failing = [r for r in runs if r.failures]
    if failing:
        md += ["", "## Failures", ""]
        for r in failing:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(r.failure_kinds.items()))
            md.append(f"- {r.label} ({r.nodes} nodes): {r.failures} of {r.calls} calls ({kinds})")
    md += ["", "## Machine and configuration", "", "| | |", "| --- | --- |"]
    md += [f"| {k} | {v} |" for k, v in machine.items()]
    md += [f"| {k} | {v} |" for k, v in config.items()]
    md.append("")
    return "\n".join(md)


def plot(runs: Sequence[RunResult], path: str, title: str = "CRS Lookup: throughput vs node processes") -> bool:
    """Throughput vs nodes with the ideal line, and node CPU per 1k lookups on a second axis.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = scaling([r for r in runs if r.label == "sweep"])
    if not rows:
        return False
    nodes = [r.run.nodes for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(nodes, [r.run.throughput for r in rows], "o-", color="tab:blue", label="measured lookups/s")
    ideal = ideal_line([r.run for r in rows])
    ax.plot([n for n, _ in ideal], [t for _, t in ideal], "--", color="tab:gray", label="ideal (linear)")
    ax.set_xlabel("node processes")
    ax.set_ylabel("lookups/s")
    ax.set_xticks(nodes)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(nodes, [r.run.node_cpu_per_1k for r in rows], "s:", color="tab:orange",
             label="node CPU-s per 1k lookups")
    base = rows[0].run.node_cpu_per_1k
    if not math.isnan(base):
        ax2.axhspan(base * (1 - LINEAR_TOLERANCE), base * (1 + LINEAR_TOLERANCE), color="tab:orange", alpha=0.1,
                    label="+-10% of smallest")
    ax2.set_ylabel("node CPU-seconds per 1,000 lookups")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    offered = [r.run.offered_calls_per_s / r.run.nodes for r in rows]
    if all(o > 0 for o in offered):
        title += f"\n(paced: {offered[0]:,.0f} calls/s offered per node)"
    else:
        title += "\n(closed loop: as fast as the load generator goes)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
