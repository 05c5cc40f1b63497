"""Scaling-sweep arithmetic and output formats; pure (tests/unit/test_loadtests_report.py).

The sweep (loadtests/sweep/run.py) measures raw numbers per run: lookups and failures in a window,
its length, CPU-seconds of the node processes, Redis and PostgreSQL, a latency histogram, and the
node's tier counters. Everything derived here:

  throughput             lookups / wall seconds
  CPU per 1,000 lookups  CPU-seconds / lookups x 1000  (node, Redis, PostgreSQL separately)
  scaling efficiency     throughput(n) / (load(n) / load(n0) x throughput(n0)), n0 = the smallest size; the
                         load is the offered calls/s when paced, the node count in a closed loop
  CPU linearity          cpu_per_1k(n) / cpu_per_1k(n0), for the nodes, Redis and PostgreSQL each:
                         1.0 = perfectly linear, within +-10 % = PASS (the requirement), else FAIL
  fixed and load cost    an idle window before the load gives each tier's CPU-seconds per second at rest;
                         (CPU in the window - that rate x its length) / lookups is the load-driven cost
  miss ratio             lookups that reached PostgreSQL / lookups the node resolved (crs_lookups_total)

A sweep has up to two series, each compared with its own smallest size: "nodes" (node processes
grow, shards fixed or growing with them) and "shards" (Redis shards grow, nodes fixed). With
--rounds K every size ran K times, interleaved with the other sizes so that a change in the machine's
background load hits every size alike; a size's figures pool its rounds (CPU and lookups summed,
latency percentiles the median of the rounds'), and the spread of the rounds' node CPU per lookup
says how much one run alone could be trusted.

On a machine where the load generator shares the cores with the service, wall throughput cannot
grow with nodes and the efficiency column says so ("client-bound"); the CPU cost per lookup is
what shows linear scaling there.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests.shared.arith import json_safe, safe_div

SCHEMA = "crs-sweep/1"                 # new fields have defaults: a report without them still reads
LINEAR_TOLERANCE = 0.10
PG_TIERS = ("l3", "l3_negative")       # crs_lookups_total tiers that were loads from PostgreSQL
SATURATED_UTIL = 0.85                  # node cores at least this busy = the nodes were the bottleneck
SERIES = ("nodes", "shards")           # what grows in a series of sweep runs
TIERS = ("node", "redis", "pg")        # whose CPU per lookup must stay within the tolerance
TIER_NAMES = {"node": "node", "redis": "Redis", "pg": "PostgreSQL"}


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
    # Redis's own counters over the window, all shards in use (INFO stats; 0 = not measured): the work
    # Redis did whatever its CPU cost on that machine.
    redis_commands: int = 0         # total_commands_processed
    redis_reads: int = 0            # total_reads_processed: read events (several commands, or part of one)
    failure_kinds: dict[str, int] = field(default_factory=dict)
    offered_calls_per_s: float = 0.0   # paced load (calls/s, all users); 0 = closed loop, as fast as possible
    series: str = "nodes"           # sweep runs: which series ("nodes" or "shards"); others ignore it
    idle_s: float = 0.0             # the idle window before the load (0 = not measured)
    node_idle_cpu_s: float = 0.0    # CPU-seconds in that idle window
    redis_idle_cpu_s: float = 0.0
    pg_idle_cpu_s: float = 0.0
    round: int = 1                  # which round of the sweep (--rounds); 0 = several rounds pooled
    started_at: float = 0.0         # unix time the measured window began (to line it up with other records)
    rounds_node_cpu_per_1k: list[float] = field(default_factory=list)   # pooled: each round's node figure

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

    def cpu_per_1k(self, tier: str) -> float:
        return {"node": self.node_cpu_per_1k, "redis": self.redis_cpu_per_1k, "pg": self.pg_cpu_per_1k}[tier]

    def idle_cores(self, tier: str) -> float:
        """CPU-seconds per second of a tier at rest (its fixed cost: pollers, timers, background work)."""
        idle = {"node": self.node_idle_cpu_s, "redis": self.redis_idle_cpu_s, "pg": self.pg_idle_cpu_s}[tier]
        return safe_div(idle, self.idle_s)

    def load_cpu_per_1k(self, tier: str) -> float:
        """CPU-seconds per 1,000 lookups above the tier's idle rate: the cost the load itself caused."""
        busy = {"node": self.node_cpu_s, "redis": self.redis_cpu_s, "pg": self.pg_cpu_s}[tier]
        return safe_div((busy - self.idle_cores(tier) * self.wall_s) * 1000, self.lookups)

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
    def redis_commands_per_lookup(self) -> float:
        """Commands Redis ran per lookup, counted by Redis (nan when not measured)."""
        return safe_div(self.redis_commands, self.lookups) if self.redis_commands else math.nan

    @property
    def redis_reads_per_lookup(self) -> float:
        """Read events (a wake-up and a read on a client connection) per lookup, counted by Redis."""
        return safe_div(self.redis_reads, self.lookups) if self.redis_reads else math.nan

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
                "redis_ops_per_lookup": self.redis_ops_per_lookup, "bytes_per_key": self.bytes_per_key,
                "redis_commands_per_lookup": self.redis_commands_per_lookup,
                "redis_reads_per_lookup": self.redis_reads_per_lookup,
                **{f"{t}_idle_cores": self.idle_cores(t) for t in TIERS},
                **{f"{t}_load_cpu_per_1k": self.load_cpu_per_1k(t) for t in TIERS}}


def run_from_json(d: Mapping[str, Any]) -> RunResult:
    names = RunResult.__dataclass_fields__
    return RunResult(**{k: v for k, v in d.items() if k in names})


# -- across a sweep --------------------------------------------------------------------------------
def within(ratio: float) -> str:
    """PASS / FAIL against the +-10 % requirement; N/A when there is nothing to compare."""
    if math.isnan(ratio):
        return "N/A"
    return "PASS" if abs(ratio - 1) <= LINEAR_TOLERANCE + 1e-9 else "FAIL"


@dataclass(frozen=True)
class ScalingRow:
    run: RunResult
    efficiency: float        # throughput(n) / (load(n)/load(n0) x throughput(n0))
    cpu_ratio: float         # node_cpu_per_1k(n) / node_cpu_per_1k(n0)
    redis_cpu_ratio: float
    pg_cpu_ratio: float = math.nan

    @property
    def size(self) -> int:
        """What grows in this row's series: node processes or Redis shards."""
        return self.run.shards if self.run.series == "shards" else self.run.nodes

    def ratio(self, tier: str) -> float:
        return {"node": self.cpu_ratio, "redis": self.redis_cpu_ratio, "pg": self.pg_cpu_ratio}[tier]

    @property
    def linear(self) -> str:
        if math.isnan(self.cpu_ratio):
            return "N/A"
        return "LINEAR" if within(self.cpu_ratio) == "PASS" else "NOT LINEAR"

    @property
    def verdict(self) -> str:
        """PASS when every tier's CPU per lookup is within the tolerance (a tier not measured is skipped)."""
        marks = [within(self.ratio(t)) for t in TIERS]
        return "FAIL" if "FAIL" in marks else ("PASS" if "PASS" in marks else "N/A")


def pool(runs: Sequence[RunResult]) -> list[RunResult]:
    """One run per size (series, nodes, shards): a size measured once stays as it is; the rounds of a
    size measured several times are summed into one (round 0), in the order sizes first appear."""
    groups: dict[tuple[str, int, int], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.series, r.nodes, r.shards), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        first = group[0]

        def total(name: str, rs: list[RunResult] = group) -> Any:
            return sum(getattr(r, name) for r in rs)

        tiers: dict[str, int] = {}
        kinds: dict[str, int] = {}
        for r in group:
            for k, v in r.tiers.items():
                tiers[k] = tiers.get(k, 0) + v
            for k, v in r.failure_kinds.items():
                kinds[k] = kinds.get(k, 0) + v
        latency = {k: statistics.median(r.latency_ms.get(k, math.nan) for r in group) for k in first.latency_ms}
        out.append(RunResult(
            label=first.label, mix=first.mix, nodes=first.nodes, shards=first.shards, node_cpus=first.node_cpus,
            locust_workers=first.locust_workers, users=first.users, wall_s=total("wall_s"), lookups=total("lookups"),
            calls=total("calls"), failures=total("failures"), expected_errors=total("expected_errors"),
            latency_ms=latency, node_cpu_s=total("node_cpu_s"), redis_cpu_s=total("redis_cpu_s"),
            pg_cpu_s=total("pg_cpu_s"), tiers=tiers, per_second=[x for r in group for x in r.per_second],
            redis_keys=max(r.redis_keys for r in group), redis_bytes=max(r.redis_bytes for r in group),
            redis_commands=total("redis_commands"), redis_reads=total("redis_reads"),
            failure_kinds=kinds, offered_calls_per_s=first.offered_calls_per_s, series=first.series,
            idle_s=total("idle_s"), node_idle_cpu_s=total("node_idle_cpu_s"),
            redis_idle_cpu_s=total("redis_idle_cpu_s"), pg_idle_cpu_s=total("pg_idle_cpu_s"), round=0,
            rounds_node_cpu_per_1k=[r.node_cpu_per_1k for r in group]))
    return out


def by_series(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """The sweep runs of each series, in SERIES order (series without runs left out)."""
    out: dict[str, list[RunResult]] = {}
    for name in SERIES:
        found = [r for r in runs if r.label == "sweep" and r.series == name]
        if found:
            out[name] = found
    return out


def _load(r: RunResult) -> float:
    return r.offered_calls_per_s if r.offered_calls_per_s > 0 else float(r.nodes)


def scaling(runs: Sequence[RunResult]) -> list[ScalingRow]:
    """The runs of one series by size, each compared with the smallest. The ideal throughput grows with
    the offered load when every run was paced, with the node count otherwise."""
    if not runs:
        return []
    key = (lambda r: (r.shards, r.nodes)) if runs[0].series == "shards" else (lambda r: (r.nodes, r.shards))
    ordered = sorted(pool(runs), key=key)
    base = ordered[0]
    paced = all(r.offered_calls_per_s > 0 for r in ordered)
    rows = []
    for r in ordered:
        ideal = base.throughput * (_load(r) / _load(base) if paced else r.nodes / base.nodes)
        rows.append(ScalingRow(r, safe_div(r.throughput, ideal), safe_div(r.node_cpu_per_1k, base.node_cpu_per_1k),
                               safe_div(r.redis_cpu_per_1k, base.redis_cpu_per_1k),
                               safe_div(r.pg_cpu_per_1k, base.pg_cpu_per_1k)))
    return rows


def all_rows(runs: Sequence[RunResult]) -> dict[int, ScalingRow]:
    """id(run) -> its row, over every series (a size of several rounds: the pooled run's id)."""
    return {id(row.run): row for group in by_series(runs).values() for row in scaling(group)}


def spread(run: RunResult) -> float:
    """(max - min) / pooled node CPU per lookup over a size's rounds; nan for a single run."""
    xs = run.rounds_node_cpu_per_1k
    return safe_div(max(xs) - min(xs), run.node_cpu_per_1k) if len(xs) > 1 else math.nan


def ideal_line(runs: Sequence[RunResult]) -> list[tuple[int, float]]:
    rows = scaling(runs)
    if not rows:
        return []
    base = rows[0].run
    paced = all(r.run.offered_calls_per_s > 0 for r in rows)
    return [(r.size, base.throughput * (_load(r.run) / _load(base) if paced else r.run.nodes / base.nodes))
            for r in rows]


def _worst(rows: Sequence[ScalingRow], tier: str) -> ScalingRow:
    return max(rows, key=lambda r: abs(r.ratio(tier) - 1) if not math.isnan(r.ratio(tier)) else -1)


def verdict(rows: Sequence[ScalingRow]) -> str:
    """One line on linearity of one series: by CPU cost per lookup of each tier (always) and by wall
    throughput (paced, or saturated)."""
    if len(rows) < 2:
        return "one configuration only: nothing to compare"
    unit = "shards" if rows[0].run.series == "shards" else "nodes"
    tol = f"+-{100 * LINEAR_TOLERANCE:.0f}%"
    worst = _worst(rows, "node")
    cpu_ok = all(r.linear == "LINEAR" for r in rows)
    text = (f"node CPU per lookup stays within {tol} of the {rows[0].size}-{unit[:-1]} "
            f"cost at every size (worst {worst.cpu_ratio:.2f}x at {worst.size} {unit}): LINEAR"
            if cpu_ok else
            f"node CPU per lookup drifts beyond {tol} (worst {worst.cpu_ratio:.2f}x at "
            f"{worst.size} {unit}): NOT LINEAR")
    for tier in ("redis", "pg"):
        marks = [within(r.ratio(tier)) for r in rows]
        if all(m == "N/A" for m in marks):
            continue
        w = _worst(rows, tier)
        state = "FAIL" if "FAIL" in marks else "PASS"
        text += (f"; {TIER_NAMES[tier]} CPU per lookup {'within' if state == 'PASS' else 'beyond'} {tol} "
                 f"(worst {w.ratio(tier):.2f}x at {w.size} {unit}): {state}")
    last = rows[-1]
    if all(r.run.offered_calls_per_s > 0 for r in rows):
        text += (f"; paced at the same load per node, {last.size} {unit} answered {last.efficiency:.2f}x "
                 f"the ideal (the smallest size's lookups/s scaled by the offered load)")
    elif all(r.run.saturated for r in rows):
        text += f"; wall-clock efficiency at {last.size} {unit} {last.efficiency:.2f}"
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


CSV_COLUMNS = ("label", "series", "round", "mix", "nodes", "shards", "locust_workers", "users", "offered_calls_per_s",
               "wall_s", "lookups", "calls", "failures", "expected_errors", "throughput", "efficiency", "error_rate",
               "p50_ms", "p95_ms", "p99_ms", "node_cpu_s", "redis_cpu_s", "pg_cpu_s", "node_cpu_per_1k",
               "redis_cpu_per_1k", "pg_cpu_per_1k", "cpu_ratio", "redis_cpu_ratio", "pg_cpu_ratio", "verdict",
               "idle_s", "node_idle_cores", "redis_idle_cores", "pg_idle_cores", "node_load_cpu_per_1k",
               "redis_load_cpu_per_1k", "pg_load_cpu_per_1k", "node_cores_busy", "node_util", "l1_ratio",
               "miss_ratio", "redis_ops_per_lookup", "redis_commands_per_lookup", "redis_reads_per_lookup",
               "bytes_per_key")


def to_csv(runs: Sequence[RunResult]) -> str:
    """One line per run; then, for sizes of several rounds, their pooled line (round "pooled"), which
    alone carries the efficiency, the ratios and the verdict."""
    rows = all_rows(runs)
    pooled = [row.run for row in rows.values() if row.run.round == 0]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in [*runs, *pooled]:
        row = rows.get(id(r))
        d = r.derived()
        values: dict[str, Any] = {**asdict(r), **d, "efficiency": row.efficiency if row else math.nan,
                                  "cpu_ratio": row.cpu_ratio if row else math.nan,
                                  "redis_cpu_ratio": row.redis_cpu_ratio if row else math.nan,
                                  "pg_cpu_ratio": row.pg_cpu_ratio if row else math.nan,
                                  "verdict": row.verdict if row else "",
                                  "series": r.series if r.label == "sweep" else "",
                                  "round": ("pooled" if r.round == 0 else r.round) if r.label == "sweep" else "",
                                  "p50_ms": r.latency_ms.get("p50", math.nan),
                                  "p95_ms": r.latency_ms.get("p95", math.nan),
                                  "p99_ms": r.latency_ms.get("p99", math.nan)}
        w.writerow(["" if isinstance(values[c], float) and math.isnan(values[c]) else
                    (round(values[c], 6) if isinstance(values[c], float) else values[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def verdicts(runs: Sequence[RunResult]) -> dict[str, str]:
    """{series: its verdict line}."""
    return {name: verdict(scaling(group)) for name, group in by_series(runs).items()}


def to_json(runs: Sequence[RunResult], machine: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    rows = all_rows(runs)
    out_runs = []
    for r in runs:
        d = asdict(r)
        d["derived"] = r.derived()
        if id(r) in rows:
            row = rows[id(r)]
            d["derived"].update(efficiency=row.efficiency, cpu_ratio=row.cpu_ratio,
                                redis_cpu_ratio=row.redis_cpu_ratio, pg_cpu_ratio=row.pg_cpu_ratio,
                                linear=row.linear, verdict=row.verdict)
        out_runs.append(d)
    sizes = []
    for row in rows.values():
        d = asdict(row.run)
        d["derived"] = {**row.run.derived(), "efficiency": row.efficiency, "cpu_ratio": row.cpu_ratio,
                        "redis_cpu_ratio": row.redis_cpu_ratio, "pg_cpu_ratio": row.pg_cpu_ratio,
                        "linear": row.linear, "verdict": row.verdict, "rounds_spread": spread(row.run)}
        sizes.append(d)
    texts = verdicts(runs)
    out: dict[str, Any] = json_safe({"schema": SCHEMA, "machine": dict(machine), "config": dict(config),
                                     "runs": out_runs, "verdict": texts.get("nodes", next(iter(texts.values()), "")),
                                     "verdicts": texts, "sizes": sizes})
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


def _cell(row: ScalingRow, tier: str) -> str:
    r = row.run
    return f"{_f(r.cpu_per_1k(tier), 3)} ({_f(row.ratio(tier), 2)}x {within(row.ratio(tier))})"


def series_title(name: str, runs: Sequence[RunResult]) -> str:
    if name == "shards":
        nodes = sorted({r.nodes for r in runs})
        return f"Redis shards grow, {', '.join(map(str, nodes))} node(s) fixed"
    shards = sorted({r.shards for r in runs})
    return f"Nodes grow, {shards[0]} shard(s) fixed" if len(shards) == 1 else "Nodes grow, and Redis shards with them"


def _series_tables(name: str, rows: Sequence[ScalingRow]) -> list[str]:
    unit = "shards" if name == "shards" else "nodes"
    mix = rows[0].run.mix if rows else "-"
    md = [f"## {series_title(name, [r.run for r in rows])} (scenario mix: `{mix}`)", "",
          f"**Verdict:** {verdict(rows)}.", "",
          f"| {unit} | {'nodes' if unit == 'shards' else 'shards'} | offered calls/s | lookups/s | efficiency "
          "| p50 ms | p99 ms | errors | node CPU-s / 1k (vs smallest) | Redis CPU-s / 1k | PG CPU-s / 1k "
          "| ±10% | rounds (node CPU spread) | node cores busy | near-cache hits | PG loads |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: "
          "| ---: |"]
    for row in rows:
        r = row.run
        other = r.nodes if unit == "shards" else r.shards
        md.append(f"| {row.size} | {other} | {_f(r.offered_calls_per_s) if r.offered_calls_per_s else 'closed loop'} "
                  f"| {_f(r.throughput)} | {_f(row.efficiency, 2)} | "
                  f"{_f(r.latency_ms.get('p50', math.nan), 2)} | {_f(r.latency_ms.get('p99', math.nan), 2)} | "
                  f"{_pct(r.error_rate, 2)} | {_cell(row, 'node')} | {_cell(row, 'redis')} | {_cell(row, 'pg')} | "
                  f"**{row.verdict}** | {max(1, len(r.rounds_node_cpu_per_1k))} ({_pct(spread(r), 0)}) | "
                  f"{_f(r.node_cores_busy, 2)} | {_pct(r.l1_ratio)} | {_pct(r.miss_ratio, 2)} |")
    if any(row.run.idle_s > 0 for row in rows):
        md += ["", "Fixed and load-driven cost: CPU-seconds per second of each tier at rest (measured just before "
               "the load, same processes), and CPU-seconds per 1,000 lookups above that rate; and the work "
               "Redis counted itself per lookup (INFO stats, whatever it cost on this machine): commands, "
               "and read events (a wake-up and a read on one connection, which may carry several commands).",
               "",
               f"| {unit} | node idle CPU-s/s | Redis idle CPU-s/s | PG idle CPU-s/s | node load CPU-s / 1k "
               "| Redis load CPU-s / 1k | PG load CPU-s / 1k | Redis commands / lookup | Redis reads / lookup |",
               "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in rows:
            r = row.run
            md.append(f"| {row.size} | " + " | ".join(_f(r.idle_cores(t), 4) for t in TIERS) + " | "
                      + " | ".join(_f(r.load_cpu_per_1k(t), 3) for t in TIERS) + " | "
                      + f"{_f(r.redis_commands_per_lookup, 3)} | {_f(r.redis_reads_per_lookup, 3)} |")
    return [*md, ""]


def markdown(runs: Sequence[RunResult], machine: Mapping[str, Any], config: Mapping[str, Any],
             plot_name: str | None = "throughput.png", notes: Sequence[str] = ()) -> str:
    """The report. `notes`: paragraphs written by whoever ran it (what the numbers mean on that machine)."""
    groups = by_series(runs)
    md = ["# CRS Lookup scaling sweep", ""]
    md.append(f"Generated by `python -m loadtests.sweep` on {machine.get('date', '?')} on "
              f"**{machine.get('name', '?')}** "
              f"({machine.get('cores', '?')} cores, {machine.get('cpu_model', '?')}). Raw numbers: "
              "[sweep.json](sweep.json), [sweep.csv](sweep.csv). Method: [docs/loadtests.md](../../loadtests.md).")
    md.append("")
    for name, group in groups.items():
        md.append(f"**{series_title(name, group)}:** {verdict(scaling(group))}.")
        md.append("")
    if not groups:
        md += ["No scaling runs.", ""]
    for note in notes:
        md += [note, ""]
    if plot_name:
        md += [f"![scaling]({plot_name})", ""]
    for name, group in groups.items():
        md += _series_tables(name, scaling(group))
    md += ["Requirement (linear cost per transaction): CPU-seconds per 1,000 lookups of the node processes, of the "
           f"Redis shards in use and of PostgreSQL each within +-{100 * LINEAR_TOLERANCE:.0f}% of the smallest "
           "size's; a size passes when all three do. Efficiency = lookups/s / (the smallest size's lookups/s x the "
           "offered-load ratio when paced, the node-count ratio in a closed loop). CPU-s / 1k lookups = CPU-seconds "
           "of those processes in the window (scheduler run time of every thread, nanosecond resolution) / lookups "
           "x 1000. Rounds: how many times the size ran, interleaved with the other sizes, pooled (CPU and "
           "lookups summed); the spread is (max - min) / pooled of the rounds' node CPU per lookup, the noise one "
           "run alone carries. Lookups are keys answered as expected (a BatchResolve of 200 keys is 200; "
           "expected NOT_FOUND / INVALID_ARGUMENT answers count); latency is per call, measured by the load "
           "generator, queueing included."]
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


def plot(runs: Sequence[RunResult], path: str) -> bool:
    """One panel per series: each tier's CPU per 1k lookups as a ratio to the smallest size, with the
    +-10 % band, and (nodes series) lookups/s against the ideal on a second axis. Returns False (and
    writes nothing) when matplotlib is not installed or there is no sweep run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = by_series(runs)
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(6.2 * len(groups), 4.6), dpi=110, squeeze=False)
    styles = {"node": ("o-", "tab:orange"), "redis": ("s-", "tab:red"), "pg": ("^-", "tab:green")}
    for ax, (name, group) in zip(axes[0], groups.items(), strict=True):
        rows = scaling(group)
        sizes = [r.size for r in rows]
        ax.axhspan(1 - LINEAR_TOLERANCE, 1 + LINEAR_TOLERANCE, color="tab:gray", alpha=0.15, label="+-10% band")
        for tier in TIERS:
            ratios = [r.ratio(tier) for r in rows]
            if not all(math.isnan(x) for x in ratios):
                style, color = styles[tier]
                base = rows[0].run.cpu_per_1k(tier)
                ax.plot(sizes, ratios, style, color=color,
                        label=f"{TIER_NAMES[tier]} CPU / lookup (1.0 = {_f(base, 3)} CPU-s / 1k)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(x) for x in sizes])
        ax.set_xlabel("Redis shards" if name == "shards" else "node processes")
        ax.set_ylabel("CPU per lookup / the smallest size's")
        finite = [r.ratio(t) for r in rows for t in TIERS if not math.isnan(r.ratio(t))]
        ax.set_ylim(min([0.5, *finite]) * 0.95, max([1.5, *finite]) * 1.05)
        ax.grid(alpha=0.3)
        run0 = rows[0].run
        load = (f"paced, {run0.offered_calls_per_s / run0.nodes:,.0f} calls/s per node"
                if all(r.run.offered_calls_per_s > 0 for r in rows) else "closed loop")
        ax.set_title(f"{series_title(name, group)}\n({load})", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        if name == "nodes":
            ax2 = ax.twinx()
            ax2.plot(sizes, [r.run.throughput for r in rows], "D:", color="tab:blue", label="lookups/s")
            ideal = ideal_line([r.run for r in rows])
            ax2.plot([n for n, _ in ideal], [t for _, t in ideal], "--", color="tab:blue", alpha=0.4,
                     label="ideal lookups/s")
            ax2.set_ylabel("lookups/s")
            ax2.set_ylim(bottom=0)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, loc="upper left", fontsize=7)
    fig.suptitle("CRS Lookup: CPU per lookup as the service grows (linear = flat within the band)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
