"""`crs-load capacity`: how many nodes, Redis shards and how much PostgreSQL read load a peak needs.

The model is arithmetic on costs MEASURED by the latest scaling sweep (docs/benchmarks/sweep/sweep.json,
written by `python -m loadtests.sweep`); nothing here is a guess except the stated assumptions
(headroom, memory per shard, the latency rule). Pure: tests/unit/test_loadtests_capacity.py checks it
against a sweep report.

  node CPU (cores)   = target x sum over scenarios of share x node CPU-s per lookup (calibration runs)
                       x node scaling penalty (the worst node-CPU-per-lookup ratio to the smallest size
                       in the sweep's nodes series, where the service grows with the load; never < 1)
  node processes     = ceil(node CPU / utilisation cap); one process uses at most one core
  utilisation cap    = min(1 - headroom, 1 - light-load p99 / p99 budget)   (M/M/1: waiting time grows
                       as 1 / (1 - utilisation), so p99 ~ light-load p99 / (1 - utilisation))
  pods               = ceil(processes / cores per pod)            (crs serve --workers = cores per pod),
                       raised until the pods left after losing the zone with the most of them, ceil(pods /
                       zones), run the node CPU within the latency cap (under 100% busy without one)
  Redis shards       = max(ceil(keys x bytes per key / (shard memory x (1 - headroom))),
                           ceil(target x Redis CPU-s per lookup x Redis penalty / (1 - headroom)))
                       (Redis: 1 core each; the penalty is the worst Redis ratio of the nodes series)
  PostgreSQL reads/s = target x miss ratio;
  PostgreSQL cores   = target x PostgreSQL CPU-s per lookup x PostgreSQL penalty (same rule)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests.shared.arith import json_safe
from loadtests.shared.keys import SCENARIOS, format_mix, parse_mix
from loadtests.shared.paths import SWEEP_REPORT
from loadtests.sweep.report import TIERS, RunResult, by_series, runs_from_report, scaling, verdict

DEFAULT_REPORT = SWEEP_REPORT
KEYS_PER_CUSTOMER = 6.5   # demo shape: 2 cards (by PAN and by token) + 1.5 accounts + the customer


@dataclass(frozen=True)
class ScenarioCost:
    """Measured cost of one lookup of a scenario (CPU-seconds per lookup) and its cache behaviour."""

    node_cpu_s: float
    redis_cpu_s: float
    pg_cpu_s: float
    miss_ratio: float
    source: str            # which run it came from


@dataclass(frozen=True)
class Costs:
    scenarios: dict[str, ScenarioCost]
    scaling_penalty: float      # node CPU per lookup, worst ratio to the smallest size; >= 1
    bytes_per_key: float
    light_p99_ms: float
    sweep_p99_ms: float
    machine: str
    date: str
    redis_penalty: float = 1.0  # the same for Redis and PostgreSQL CPU per lookup
    pg_penalty: float = 1.0
    linearity: dict[str, str] = field(default_factory=dict)   # series -> the sweep's verdict on it


def penalties(runs: list[RunResult]) -> dict[str, float]:
    """{tier: the worst CPU-per-lookup ratio to the smallest size in the nodes series, never below 1}.

    Only the nodes series: there the load grows with the service (paced per node, and with the shards
    when --shards grows with --nodes), which is how a deployment grows. The shards series adds shards
    at a fixed load; what it shows (each shard's fixed cost, spread over fewer lookups) is in its verdict,
    and at production rates that fixed cost is a rounding error (docs/loadtests.md)."""
    out = dict.fromkeys(TIERS, 1.0)
    for row in scaling(by_series(runs).get("nodes", [])):
        for tier in TIERS:
            if not math.isnan(row.ratio(tier)):
                out[tier] = max(out[tier], row.ratio(tier))
    return out


def _cost(run: RunResult) -> ScenarioCost:
    def per(x: float) -> float:
        return x / run.lookups if run.lookups else math.nan

    # nan when the run counted no tiers (its /metrics could not be scraped): unknown, not 0
    return ScenarioCost(per(run.node_cpu_s), per(run.redis_cpu_s), per(run.pg_cpu_s), run.miss_ratio,
                        f"{run.label} ({run.nodes} node(s))")


def costs_from_report(report: Mapping[str, Any]) -> Costs:
    """Per-scenario costs from the calibration runs; the sweep's own mix fills any scenario not
    calibrated only when the sweep ran that scenario alone."""
    runs = runs_from_report(report)
    scenarios: dict[str, ScenarioCost] = {}
    for r in runs:
        if r.label.startswith("calibrate:") and r.lookups > 0:
            scenarios[r.label.split(":", 1)[1]] = _cost(r)
    usable = [r for r in runs if r.lookups > 0]
    groups = by_series(usable)
    rows = scaling(groups.get("nodes", []))
    if rows:
        base = rows[0].run
        mix = parse_mix(base.mix)
        if len(mix) == 1:
            scenarios.setdefault(next(iter(mix)), _cost(base))
    if not scenarios:
        raise ValueError("the sweep report has no usable run (no lookups measured)")
    worst = penalties(usable)
    sizes = [r.bytes_per_key for r in runs if r.redis_keys > 0 and not math.isnan(r.bytes_per_key)]
    light = [r for r in runs if r.label == "light" and r.lookups > 0]
    light_p99 = light[0].latency_ms.get("p99", math.nan) if light else math.nan
    sweep_p99 = rows[0].run.latency_ms.get("p99", math.nan) if rows else math.nan
    machine = report.get("machine", {})
    return Costs(scenarios, worst["node"], max(sizes) if sizes else math.nan, light_p99, sweep_p99,
                 str(machine.get("name", "?")), str(machine.get("date", "?")), redis_penalty=worst["redis"],
                 pg_penalty=worst["pg"], linearity={name: verdict(scaling(g)) for name, g in groups.items()})


@dataclass(frozen=True)
class Request:
    target: float                           # lookups/s at peak
    mix: dict[str, float]                   # share of lookups per scenario (sums to 1)
    p99_budget_ms: float
    cores_per_pod: int = 4
    headroom: float = 0.3                   # fraction of every resource kept free
    keys: float = 0.0                       # distinct keys to keep in Redis (0 = from customers)
    customers: float = 10_000_000
    shard_memory_gb: float = 8.0
    miss_ratio: float | None = None         # override the measured one
    zones: int = 3                          # zones the pods are spread over; 1 = no zone-loss check


@dataclass
class Answer:
    request: Request
    node_cores: float
    utilisation_cap: float
    latency_cap: float
    processes: int
    pods: int
    redis_cores: float
    shards_for_memory: int
    shards_for_ops: int
    shards: int
    redis_gb: float
    pg_reads_per_s: float
    pg_cores: float
    miss_ratio: float
    per_lookup: dict[str, float]
    feasible: bool
    notes: list[str] = field(default_factory=list)


def plan(req: Request, costs: Costs) -> Answer:
    numbers = (req.target, req.headroom, req.keys, req.customers, req.shard_memory_gb, req.p99_budget_ms)
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError("every number of the request must be finite (not inf or nan)")
    if req.target <= 0:
        raise ValueError("target lookups/s must be > 0")
    if not 0 <= req.headroom < 1:
        raise ValueError("headroom must be in [0, 1)")
    if req.cores_per_pod < 1 or req.shard_memory_gb <= 0 or req.p99_budget_ms <= 0 or req.zones < 1:
        raise ValueError("cores per pod, zones, shard memory and the p99 budget must be > 0")
    if req.keys < 0 or req.customers < 0:
        raise ValueError("keys and customers must be >= 0")
    if req.miss_ratio is not None and not 0 <= req.miss_ratio <= 1:   # also nan
        raise ValueError(f"the miss ratio is a fraction of lookups, in [0, 1] (got {req.miss_ratio})")
    missing = [s for s in req.mix if s not in costs.scenarios]
    if missing:
        raise ValueError(f"the sweep report has no measured cost for {', '.join(missing)}; rerun "
                         f"`python -m loadtests.sweep --calibrate {','.join(missing)}` or change the mix "
                         f"(measured: {', '.join(sorted(costs.scenarios))})")
    total = sum(req.mix.values())
    mix = {s: w / total for s, w in req.mix.items()}

    def weighted(attr: str) -> float:
        return float(sum(share * getattr(costs.scenarios[s], attr) for s, share in mix.items()))

    node_cpu, redis_cpu, pg_cpu = weighted("node_cpu_s"), weighted("redis_cpu_s"), weighted("pg_cpu_s")
    miss = req.miss_ratio if req.miss_ratio is not None else weighted("miss_ratio")
    notes: list[str] = []
    feasible = True
    if math.isnan(miss):
        unmeasured = sorted(s for s in mix if math.isnan(costs.scenarios[s].miss_ratio))
        notes.append(f"the sweep measured no cache-miss ratio for {', '.join(unmeasured)} (no tier counters): "
                     "PostgreSQL reads/s not planned; give --miss-ratio")

    latency_cap = math.nan
    if not math.isnan(costs.light_p99_ms):
        latency_cap = 1.0 - costs.light_p99_ms / req.p99_budget_ms
        if latency_cap <= 0:
            feasible = False
            notes.append(f"the p99 budget {req.p99_budget_ms:g} ms is below the light-load p99 measured by the "
                         f"sweep ({costs.light_p99_ms:.2f} ms, load generator included): more nodes cannot reach it")
            latency_cap = math.nan
    else:
        notes.append("the report has no light-load run: the p99 budget was not checked")
    cap = min(1.0 - req.headroom, latency_cap) if not math.isnan(latency_cap) else 1.0 - req.headroom

    node_cores = req.target * node_cpu * costs.scaling_penalty
    processes = max(1, math.ceil(node_cores / cap - 1e-9))
    pods = math.ceil(processes / req.cores_per_pod)
    if req.zones > 1:
        # A lost zone takes the most pods any zone holds, ceil(pods / zones); the pods left must carry the
        # whole load within the latency cap (headroom is for the normal day), or under 100% busy.
        zone_cap = latency_cap if not math.isnan(latency_cap) else 1.0
        survivors = max(1, math.ceil(node_cores / zone_cap - 1e-9))
        zone_pods = pods
        while (zone_pods - math.ceil(zone_pods / req.zones)) * req.cores_per_pod < survivors:
            zone_pods += 1
        if zone_pods > pods:
            pods, processes = zone_pods, zone_pods * req.cores_per_pod
        left = pods - math.ceil(pods / req.zones)
        notes.append(f"sized to lose one of {req.zones} zones: {left} pod(s) left, at <= "
                     f"{100 * node_cores / (left * req.cores_per_pod):.0f}% busy")

    keys = req.keys if req.keys > 0 else req.customers * KEYS_PER_CUSTOMER
    bytes_per_key = costs.bytes_per_key if not math.isnan(costs.bytes_per_key) else 1024.0
    if math.isnan(costs.bytes_per_key):
        notes.append("the report has no Redis memory figure: assumed 1 KiB per key")
    redis_gb = keys * bytes_per_key / 1e9
    usable_gb = req.shard_memory_gb * (1 - req.headroom)
    shards_mem = max(1, math.ceil(redis_gb / usable_gb - 1e-9))
    redis_cores = req.target * redis_cpu * costs.redis_penalty
    shards_ops = max(1, math.ceil(redis_cores / (1 - req.headroom) - 1e-9))
    for name, penalty in (("node", costs.scaling_penalty), ("Redis", costs.redis_penalty),
                          ("PostgreSQL", costs.pg_penalty)):
        if penalty > 1.0:
            notes.append(f"{name} CPU per lookup grew to {penalty:.2f}x of the smallest size in the sweep; "
                         f"the {name} figure includes that penalty")
    return Answer(req, node_cores, cap, latency_cap, processes, pods, redis_cores, shards_mem, shards_ops,
                  max(shards_mem, shards_ops), redis_gb, req.target * miss, req.target * pg_cpu * costs.pg_penalty,
                  miss,
                  {"node_cpu_ms": node_cpu * 1000, "redis_cpu_ms": redis_cpu * 1000, "pg_cpu_ms": pg_cpu * 1000},
                  feasible, notes)


def render(ans: Answer, costs: Costs, report_path: str) -> str:
    r = ans.request
    lines = [
        f"Capacity for {r.target:,.0f} lookups/s, mix {format_mix(r.mix)}, p99 budget {r.p99_budget_ms:g} ms",
        f"(costs measured by the sweep on {costs.machine}, {costs.date}: {report_path})",
        "",
        f"  nodes        {ans.processes} node processes = {ans.pods} pod(s) of {r.cores_per_pod} cores "
        f"(crs serve --workers {r.cores_per_pod})",
        f"               node CPU needed {ans.node_cores:.2f} cores at {ans.per_lookup['node_cpu_ms']:.3f} ms CPU per "
        f"lookup; planned at <= {100 * ans.utilisation_cap:.0f}% busy",
        f"  Redis        {ans.shards} shard(s): {ans.shards_for_memory} for memory ({ans.redis_gb:,.1f} GB of "
        f"cached answers in {r.shard_memory_gb:g} GB shards), {ans.shards_for_ops} for load "
        f"({ans.redis_cores:.2f} Redis cores)",
        (f"  PostgreSQL   {ans.pg_reads_per_s:,.0f} reads/s at a {100 * ans.miss_ratio:.2f}% cache-miss ratio; "
         if not math.isnan(ans.miss_ratio) else "  PostgreSQL   reads/s not measured (see the notes); ")
        + f"~{ans.pg_cores:.2f} cores of PostgreSQL CPU",
        "",
        "Assumptions:",
        f"  - headroom {100 * r.headroom:.0f}%: nodes, Redis CPU and Redis memory are planned at most "
        f"{100 * (1 - r.headroom):.0f}% used (a retry storm, a cold cache after a deploy; a lost zone: below)",
        "  - latency rule: p99 ~ light-load p99 / (1 - utilisation) (M/M/1); light-load p99 "
        + (f"{costs.light_p99_ms:.2f} ms" if not math.isnan(costs.light_p99_ms) else "not measured")
        + (f" allows <= {100 * ans.latency_cap:.0f}% busy" if not math.isnan(ans.latency_cap) else ""),
        "  - one node process uses at most one core; CPU per lookup as measured, on that machine's cores",
        *[f"  - linear cost, as the sweep measured it ({name} series): {text}"
          for name, text in costs.linearity.items()],
        f"  - keys cached: {r.keys or r.customers * KEYS_PER_CUSTOMER:,.0f} "
        + ("" if r.keys else f"({r.customers:,.0f} customers x {KEYS_PER_CUSTOMER} keys each) ")
        + f"x {costs.bytes_per_key:.0f} bytes per key (Redis used_memory / keys in the sweep)",
        "  - miss ratio " + ("as given" if r.miss_ratio is not None else "as measured in the sweep's warm runs "
                             "(steady state; a cold start or a key set larger than Redis reads far more)"),
    ]
    lines += [f"  - {n}" for n in ans.notes]
    if not ans.feasible:
        lines += ["", "NOT FEASIBLE as asked: see the notes above."]
    return "\n".join(lines)


# -- CLI -------------------------------------------------------------------------------------------------
def number(low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False,
           whole: bool = False) -> Any:
    """An argparse type: a finite number within [low, high] (a bound open where asked), refused while
    parsing with the range in the message; `plan` checks the same, for callers other than the CLI."""
    if high == math.inf:
        limits = f"{'>' if open_low else '>='} {low:g}"
    else:
        limits = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float | int:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            value = math.nan
        inside = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if whole else ''}number {limits}")
        return value
    return parse


def _args_to_request(args: argparse.Namespace, costs: Costs) -> Request:
    mix = parse_mix(args.mix) if args.mix else None
    if mix is None:   # default: the measured scenarios, equally weighted
        mix = {s: 1 / len(costs.scenarios) for s in costs.scenarios}
    return Request(target=args.target, mix=mix, p99_budget_ms=args.p99_ms, cores_per_pod=args.cores_per_pod,
                   headroom=args.headroom, keys=args.keys, customers=args.customers,
                   shard_memory_gb=args.shard_memory_gb, miss_ratio=args.miss_ratio, zones=args.zones)


def cmd_capacity(args: argparse.Namespace) -> int:
    try:
        report = json.loads(Path(args.report).read_text())
        if not isinstance(report, dict):
            raise ValueError(f"{args.report} is not a sweep report (a JSON object)")
        costs = costs_from_report(report)
        answer = plan(_args_to_request(args, costs), costs)
    except FileNotFoundError:
        print(f"crs-load capacity: no sweep report at {args.report}; run `python -m loadtests.sweep` first",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"crs-load capacity: --report {args.report}: cannot read it: {exc.strerror}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"crs-load capacity: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = asdict(answer)
        out["costs"] = asdict(costs)
        print(json.dumps(json_safe(out), indent=2, allow_nan=False))   # standard JSON: "no value" is null
    else:
        print(render(answer, costs, str(args.report)))
    return 0 if answer.feasible else 1


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `capacity` to a CLI's subparsers (`crs-load`, loadtests/cli.py)."""
    p = subparsers.add_parser(
        "capacity", help="nodes, Redis shards and PostgreSQL load for a target lookups/s (from the sweep report)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: crs-load capacity --target 50000 --mix retail=80,ach=15,customer=5 --p99-ms 20 "
               "--cores-per-pod 4 --customers 30000000\nExit status: 0 feasible, 1 not feasible as asked "
               "(p99 budget), 2 bad input or no report.")
    p.add_argument("--target", type=number(0, open_low=True), required=True, help="peak lookups per second to serve")
    p.add_argument("--mix", default="", help=f"share of lookups by scenario, e.g. retail=80,ach=20 (scenarios: "
                                             f"{', '.join(SCENARIOS)}; default: every measured scenario equally)")
    p.add_argument("--p99-ms", type=number(0, open_low=True), default=50.0,
                   help="p99 latency budget in ms (default 50)")
    p.add_argument("--cores-per-pod", type=number(1, whole=True), default=4,
                   help="cores (= node processes) per pod (default 4)")
    p.add_argument("--headroom", type=number(0, 1, open_high=True), default=0.3,
                   help="fraction of capacity kept spare, in [0, 1) (default 0.3)")
    p.add_argument("--customers", type=number(0), default=10_000_000,
                   help=f"customers whose keys stay cached ({KEYS_PER_CUSTOMER} keys each; default 10000000)")
    p.add_argument("--keys", type=number(0), default=0, help="distinct cached keys (overrides --customers)")
    p.add_argument("--zones", type=number(1, whole=True), default=3,
                   help="zones the node pods are spread over: the pods left after losing one must carry the "
                        "peak within the p99 budget (default 3; 1 = no zone-loss check)")
    p.add_argument("--shard-memory-gb", type=number(0, open_low=True), default=8.0,
                   help="memory per Redis shard (default 8)")
    p.add_argument("--miss-ratio", type=number(0, 1), default=None,
                   help="cache-miss ratio to plan PostgreSQL for, a fraction in [0, 1]: 0.05 = 5%% of lookups"
                        " (default: as measured)")
    p.add_argument("--report", default=str(DEFAULT_REPORT), help="sweep.json to read (default: the committed one)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=cmd_capacity)
    parser: argparse.ArgumentParser = p
    return parser

