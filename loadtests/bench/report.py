"""Benchmark arithmetic and output formats; pure functions, no I/O (tests/unit/test_benchmark_report.py).

A phase's raw numbers (work done, wall seconds, server CPU-seconds, latency samples) come from the
load generator; everything derived — rates, per-server-core rates, ratios, PASS/MISS — is computed
here, once, and the console table, the markdown page and the JSON file all read the same values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests.shared.arith import json_safe, safe_div

SCHEMA_VERSION = 1
CEILING = "echo"   # the phase whose per-core rate is the ceiling


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence; nan when empty."""
    if not sorted_values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, not {q}")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds, and the sample count, from latencies in seconds."""
    ordered = sorted(samples_s)
    out = {f"p{q}": percentile(ordered, q) * 1000 for q in (50, 90, 99)}
    out["max"] = ordered[-1] * 1000 if ordered else math.nan
    out["n"] = float(len(ordered))
    return out


@dataclass
class PhaseResult:
    """One measured phase. `items` are lookups (keys answered): a BatchResolve call answers many."""

    key: str                       # "echo", "l1", ...
    title: str
    unit: str                      # "lookups" or "keys"
    server: str                    # whose CPU "per server core" divides by, in words
    items: int                     # answered OK in the window
    calls: int                     # RPCs (or queries) completed in the window
    errors: int
    wall_s: float
    server_cpu_s: float
    backend_cpu_s: float = 0.0     # Redis + PostgreSQL during the window (node phases only)
    client_cpu_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)       # under load, per call
    idle_latency_ms: dict[str, float] = field(default_factory=dict)  # one call in flight
    tiers: dict[str, int] = field(default_factory=dict)              # crs_lookups_total deltas
    load: str = ""                 # how it was driven, e.g. "aio, 64 in flight, 4 channels"
    reference: bool = False        # shown, but not part of the targets (e.g. the other client)
    round_per_core: list[float] = field(default_factory=list)   # per-core rate of each round
    round_p99_ms: list[float] = field(default_factory=list)     # p99 under load of each round

    @property
    def spread(self) -> float:
        """Half the relative difference between the best and the worst round's per-core rate: the
        run-to-run noise of this phase on this machine (nan with fewer than two rounds)."""
        rates = [x for x in self.round_per_core if not math.isnan(x)]
        if len(rates) < 2 or max(rates) + min(rates) <= 0:
            return math.nan
        return (max(rates) - min(rates)) / (max(rates) + min(rates))

    @property
    def wall_rate(self) -> float:
        return safe_div(self.items, self.wall_s)

    @property
    def pooled_per_core(self) -> float:
        """Items per server CPU-second over all rounds together."""
        return safe_div(self.items, self.server_cpu_s)

    @property
    def per_core(self) -> float:
        """Items per CPU-second of the server process in its best round: the figure the ratios and
        targets use. Interference from other processes (cache and core contention, a busy host)
        only ever makes a call cost more CPU, so the best round is the closest to the code's own
        cost — the reasoning behind timeit's minimum. With one round it is the pooled figure."""
        rounds = [x for x in self.round_per_core if not math.isnan(x)]
        return max(rounds) if rounds else self.pooled_per_core

    @property
    def all_in_per_core(self) -> float:
        """Items per CPU-second of the server and its backends together (Redis, PostgreSQL)."""
        return safe_div(self.items, self.server_cpu_s + self.backend_cpu_s)

    @property
    def server_util(self) -> float:
        """Fraction of one core the server used: near 1.0 means the load kept it busy."""
        return safe_div(self.server_cpu_s, self.wall_s)

    @property
    def client_util(self) -> float:
        return safe_div(self.client_cpu_s, self.wall_s)

    @property
    def server_us_per_item(self) -> float:
        """Server CPU microseconds per item, from the per-core figure (best round)."""
        return safe_div(1e6, self.per_core)


def merge_rounds(raws: Sequence[Mapping[str, Any]], **describe: Any) -> PhaseResult:
    """One PhaseResult from the load generator's results of each round of a phase: work, time and CPU
    are summed (so the rates are pooled over all rounds), latency samples pooled, and each round's
    per-core rate kept to measure the noise. `describe` gives key, title, unit, server, load, ..."""
    if not raws:
        raise ValueError("merge_rounds needs at least one round")

    def total(name: str) -> Any:
        return sum(r.get(name, 0) for r in raws)

    tiers: dict[str, int] = {}
    for r in raws:
        for tier, n in r.get("tiers", {}).items():
            tiers[tier] = tiers.get(tier, 0) + n
    return PhaseResult(
        items=total("items"), calls=total("calls"), errors=total("errors"), wall_s=total("wall_s"),
        server_cpu_s=total("server_cpu_s"), backend_cpu_s=total("backend_cpu_s"),
        client_cpu_s=total("client_cpu_s"),
        latency_ms=latency_summary([x for r in raws for x in r.get("latency_s", ())]),
        idle_latency_ms=latency_summary([x for r in raws for x in r.get("idle_latency_s", ())]),
        tiers=tiers, round_per_core=[safe_div(r["items"], r["server_cpu_s"]) for r in raws],
        round_p99_ms=[latency_summary(r.get("latency_s", ()))["p99"] for r in raws], **describe)


def ceiling_per_core(results: Mapping[str, PhaseResult]) -> float:
    return results[CEILING].per_core if CEILING in results else math.nan


@dataclass(frozen=True)
class Target:
    name: str
    phase: str            # the phase measured
    baseline: str         # the phase it is compared with ("ceiling" = echo), or P99 (a latency bound)
    threshold: float      # ratio that must be reached (for P99: milliseconds not to exceed)
    ratio: float          # measured (nan when a phase is missing)
    noise: float = math.nan   # relative run-to-run spread of the two phases compared, when known

    @property
    def status(self) -> str:
        if math.isnan(self.ratio):
            return "N/A"
        if self.baseline == P99:
            return "PASS" if self.ratio <= self.threshold else "MISS"
        return "PASS" if self.ratio >= self.threshold else "MISS"

    @property
    def marginal(self) -> bool:
        """The ratio is within the measured noise of the threshold: another run may flip it."""
        if math.isnan(self.ratio) or math.isnan(self.noise):
            return False
        return abs(self.ratio / self.threshold - 1) <= self.noise

    @property
    def verdict(self) -> str:
        return self.status + (" (marginal)" if self.marginal else "")


P99 = "p99 ms"   # a Target baseline: the phase's p99 latency under its load, in ms, must stay at or below


def _targets(model: str) -> tuple[tuple[str, str, str, float], ...]:
    x = "" if model == "aio" else f"_{model}"
    return (
        (f"[{model}] near-cache hit vs grpc.aio echo", f"l1{x}", "ceiling", 1.3),
        (f"[{model}] near-cache hit vs sync grpc.server echo", f"l1{x}", "echo_sync", 0.85),
        (f"[{model}] Redis hit vs grpc.aio echo", f"l2{x}", "ceiling", 1.0),
        (f"[{model}] StreamResolve vs unary near-cache lookups", f"stream{x}", f"l1{x}", 2.5),
        (f"[{model}] BatchResolve(100) keys vs grpc.aio echo calls", f"batch{x}", "ceiling", 35.0),
        (f"[{model}] near-cache p99 at half of saturation (ms)", f"l1_half{x}", P99, 2.0),
    )


# (name, phase, baseline, threshold): every ratio is per server core; issue 12's targets, per serving model.
TARGETS = _targets("aio") + _targets("hybrid")


def ratio_to(results: Mapping[str, PhaseResult], phase: str, baseline: str) -> float:
    if phase not in results:
        return math.nan
    if baseline == P99:
        return results[phase].latency_ms.get("p99", math.nan)
    base = ceiling_per_core(results) if baseline == "ceiling" else (
        results[baseline].per_core if baseline in results else math.nan)
    return safe_div(results[phase].per_core, base) if not math.isnan(base) else math.nan


def _noise(results: Mapping[str, PhaseResult], phase: str, baseline: str) -> float:
    if baseline == P99:
        return math.nan
    base = CEILING if baseline == "ceiling" else baseline
    spreads = [results[k].spread for k in (phase, base) if k in results and not math.isnan(results[k].spread)]
    return max(spreads) if spreads else math.nan


def evaluate_targets(results: Mapping[str, PhaseResult]) -> list[Target]:
    return [Target(name, phase, base, threshold, ratio_to(results, phase, base), _noise(results, phase, base))
            for name, phase, base, threshold in TARGETS]


# (label, stream ceiling, its unary ceiling, the node's stream, the node's unary): what each gRPC server's
# own streams reach against its own unary calls, the bound on the node's "StreamResolve vs unary" ratio.
STREAM_CEILINGS = (("grpc.aio", "echo_stream", "echo", "stream", "l1"),
                   ("sync grpc.server", "echo_sync_stream", "echo_sync", "stream_hybrid", "l1_hybrid"))


def ceilings_line(results: Mapping[str, PhaseResult]) -> str:
    """The stream ceilings next to the node's stream ratio, or "" when the echo stream phases did not run."""
    parts = []
    for label, stream, unary, node_stream, node_unary in STREAM_CEILINGS:
        ceiling = ratio_to(results, stream, unary)
        if math.isnan(ceiling):
            continue
        part = f"{label} echo's own streams {_fmt_ratio(ceiling)} its unary calls"
        node = ratio_to(results, node_stream, node_unary)
        if not math.isnan(node):
            part += f" (the node on it: {_fmt_ratio(node)})"
        parts.append(part)
    return ("Ceilings, per server core: " + "; ".join(parts) + ".") if parts else ""


# (label, the node's half-load phase, the bare server's): the p99 target next to its gRPC server's own floor.
HALF_LOAD_FLOORS = (("aio", "l1_half", "echo_half", "grpc.aio echo"),
                    ("hybrid", "l1_half_hybrid", "echo_sync_half", "sync grpc.server echo"))


def half_load_line(results: Mapping[str, PhaseResult]) -> str:
    """The p99 at half of saturation of each round, the node's next to the bare gRPC server's paced the
    same way in the same rounds: the pooled p99 alone hides a round that one stall (of this machine, or
    of the node) made, and the floor below which no node on that server can answer."""
    def rounds(key: str) -> str:
        return " / ".join(_fmt_ms(x) for x in results[key].round_p99_ms) + " ms"

    parts = []
    for model, node, echo, label in HALF_LOAD_FLOORS:
        if node in results and results[node].round_p99_ms:
            part = f"[{model}] node {rounds(node)}"
            if echo in results and results[echo].round_p99_ms:
                part += f", the bare {label} {rounds(echo)}"
            parts.append(part)
    return ("p99 at half of saturation, per round: " + "; ".join(parts) + ".") if parts else ""


def target_notes(results: Sequence[PhaseResult]) -> list[str]:
    """The lines printed under the targets (console and markdown alike): the stream ceilings and the
    half-load p99 per round, each where its phases ran."""
    by_key = {r.key: r for r in results}
    return [line for line in (ceilings_line(by_key), half_load_line(by_key)) if line]


def noise_line(results: Sequence[PhaseResult]) -> str:
    measured = [r for r in results if not math.isnan(r.spread)]
    if not measured:
        return "Run-to-run noise: unknown (one round; use --rounds 2 or more to measure it)."
    parts = ", ".join(f"{r.key} +-{100 * r.spread:.1f}%" for r in measured)
    return ("Run-to-run noise (half the spread of the per-core rate between rounds): " + parts
            + ". A target within the noise of its two phases is marked marginal.")


# -- output ------------------------------------------------------------------------------------
def _fmt_rate(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}"


def _fmt_ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def _fmt_target(t: Target) -> str:
    return _fmt_ms(t.ratio) + " ms" if t.baseline == P99 else _fmt_ratio(t.ratio)


def _fmt_needed(t: Target) -> str:
    return f"<= {t.threshold:g} ms" if t.baseline == P99 else f">= {t.threshold:g}x"


def _fmt_pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def _tiers_text(tiers: Mapping[str, int]) -> str:
    total = sum(tiers.values())
    if not total:
        return ""
    parts = sorted(tiers.items(), key=lambda kv: -kv[1])
    return " ".join(f"{k} {100 * v / total:.1f}%" for k, v in parts if v)


COLUMNS = ("phase", "unit/s wall", "server CPU", "unit/s per server core", "x echo (per core)",
           "p50 ms", "p99 ms", "idle p50 ms", "idle p99 ms", "answered by")


def table_rows(results: Sequence[PhaseResult]) -> list[list[str]]:
    by_key = {r.key: r for r in results}
    ceiling = ceiling_per_core(by_key)
    rows = []
    for r in results:
        title = r.title + (f" [ERRORS: {r.errors}]" if r.errors else "")
        rows.append([
            title,
            f"{_fmt_rate(r.wall_rate)} {r.unit}",
            _fmt_pct(r.server_util),
            f"{_fmt_rate(r.per_core)} {r.unit}",
            _fmt_ratio(safe_div(r.per_core, ceiling)) if not math.isnan(ceiling) else "-",
            _fmt_ms(r.latency_ms.get("p50")),
            _fmt_ms(r.latency_ms.get("p99")),
            _fmt_ms(r.idle_latency_ms.get("p50")),
            _fmt_ms(r.idle_latency_ms.get("p99")),
            _tiers_text(r.tiers),
        ])
    return rows


def console_table(results: Sequence[PhaseResult], targets: Sequence[Target]) -> str:
    rows = table_rows(results)
    headers = list(COLUMNS)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    right = {1, 2, 3, 4, 5, 6, 7, 8}

    def line(cells: Sequence[str]) -> str:
        cols = zip(cells, widths, strict=True)
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(cols)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    out.append("")
    out.append("Ratios and targets use the per-server-core figure (work / CPU-seconds of the server process, "
               "best round); wall-clock rates pool all rounds.")
    for t in targets:
        out.append(f"  {t.verdict:15}  {t.name}: {_fmt_target(t)} (target {_fmt_needed(t)})")
    out += [*target_notes(results), noise_line(results)]
    return "\n".join(out)


def markdown(results: Sequence[PhaseResult], targets: Sequence[Target], machine: Mapping[str, Any],
             config: Mapping[str, Any]) -> str:
    rows = table_rows(results)
    md = ["# CRS Lookup benchmark: latest run", ""]
    md.append(f"Generated by `python -m loadtests.bench` on {machine.get('date', '?')}. "
              "Method: [README.md](README.md). Raw numbers: [latest.json](latest.json).")
    md += ["", "## Machine", "", "| | |", "| --- | --- |"]
    for label, key in (("CPU", "cpu_model"), ("cores", "cores"), ("kernel", "kernel"), ("Python", "python"),
                       ("grpcio", "grpcio"), ("protobuf", "protobuf"), ("uvloop", "uvloop"), ("asyncpg", "asyncpg"),
                       ("PostgreSQL", "postgresql"), ("Redis", "redis"), ("pinning", "pinning"),
                       ("load average at start", "load_average_at_start"), ("commit", "commit")):
        if key in machine:
            md.append(f"| {label} | {machine[key]} |")
    md += ["", "## Results", ""]
    md.append("Per-server-core = work / CPU-seconds of the server process in the window (the node, the "
              "echo server, or PostgreSQL for the asyncpg rows), best round. **Ratios use the per-core "
              "figure.** Wall-clock rates pool all rounds. Latency under load is per call at the stated "
              "concurrency (queueing included); "
              "idle latency is one call in flight.")
    md += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    md += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    md += ["", "## Targets (per server core)", "", "| target | measured | needed | result |",
           "| --- | --- | --- | --- |"]
    for t in targets:
        md.append(f"| {t.name} | {_fmt_target(t)} | {_fmt_needed(t)} | **{t.verdict}** |")
    for note in (*target_notes(results), noise_line(results)):
        md += ["", note]
    md += ["", "## Load and server-side CPU per phase", "",
           "| phase | load | server CPU us/item | backends CPU s | per core, server + backends | client CPU | items "
           "| calls | errors |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        md.append(f"| {r.title} | {r.load} | {r.server_us_per_item:.1f} | {r.backend_cpu_s:.2f} | "
                  f"{_fmt_rate(r.all_in_per_core)} | {_fmt_pct(r.client_util)} | {r.items:,} | {r.calls:,} "
                  f"| {r.errors} |")
    md += ["", "## Configuration", "", "```"]
    md += [f"{k} = {v}" for k, v in config.items()]
    md += ["```", ""]
    return "\n".join(md)


def to_json(results: Sequence[PhaseResult], targets: Sequence[Target], machine: Mapping[str, Any],
            config: Mapping[str, Any]) -> dict[str, Any]:
    by_key = {r.key: r for r in results}
    ceiling = ceiling_per_core(by_key)
    phases = []
    for r in results:
        d = asdict(r)
        d.update(wall_rate=r.wall_rate, per_core=r.per_core, pooled_per_core=r.pooled_per_core,
                 all_in_per_core=r.all_in_per_core, spread=r.spread,
                 server_util=r.server_util, client_util=r.client_util, server_us_per_item=r.server_us_per_item,
                 ratio_to_ceiling_per_core=safe_div(r.per_core, ceiling))
        phases.append(d)
    doc: dict[str, Any] = json_safe({
        "schema": SCHEMA_VERSION,
        "machine": dict(machine),
        "config": dict(config),
        "ceiling_per_core": ceiling,
        "ratio_basis": "per server core (items / server CPU-seconds)",
        "phases": phases,
        "targets": [{"name": t.name, "phase": t.phase, "baseline": t.baseline, "threshold": t.threshold,
                     "ratio": t.ratio, "status": t.status, "noise": t.noise, "marginal": t.marginal} for t in targets],
    })
    return doc
