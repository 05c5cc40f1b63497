"""Load-test report math: latency histograms, windows, sweep derivations and outputs, CPU layout."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path

import pytest

from loadtests.shared.latency import (
    Histogram,
    Timeline,
    WindowStats,
    bucket_of,
    bucket_upper_ms,
    coefficient_of_variation,
)
from loadtests.shared.machine import cores_first, describe_topology, parse_cpu_list, sibling_sets
from loadtests.sweep.report import (
    RunResult,
    by_series,
    ideal_line,
    markdown,
    plot,
    runs_from_report,
    scaling,
    spread,
    to_csv,
    to_json,
    verdict,
    within,
)
from loadtests.sweep.run import calibration_users, paced_spec, parse_args, plan_layout, rerender


# -- histograms --------------------------------------------------------------------------------------
def test_buckets_are_one_percent_wide() -> None:
    for ms in (0.0005, 0.002, 0.137, 1.0, 12.5, 999.0):
        b = bucket_of(ms)
        assert bucket_upper_ms(b - 1) < ms <= bucket_upper_ms(b) * (1 + 1e-9) or ms <= 0.001


def test_percentiles_within_one_percent_of_exact() -> None:
    rng = random.Random(9)
    samples = [rng.lognormvariate(0, 1.2) for _ in range(20_000)]   # ms, a long-tailed latency shape
    h = Histogram()
    for s in samples:
        h.add(s)
    ordered = sorted(samples)
    for q in (50, 95, 99, 99.9):
        exact = ordered[math.ceil(q / 100 * len(ordered)) - 1]
        assert exact <= h.percentile(q) <= exact * 1.0101, q
    assert h.percentile(100) == pytest.approx(max(samples))
    assert h.mean_ms == pytest.approx(sum(samples) / len(samples))
    assert math.isnan(Histogram().percentile(50))
    with pytest.raises(ValueError):
        h.percentile(101)


def test_histograms_merge_and_round_trip() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(1, 500):
        (a if i % 2 else b).add(i / 10)
        both.add(i / 10)
    a.merge(b)
    assert a.counts == both.counts and a.n == both.n and a.percentile(99) == both.percentile(99)
    again = Histogram.from_json(json.loads(json.dumps(a.to_json())))
    assert again.summary() == a.summary()


def test_window_counts_and_timeline() -> None:
    t = Timeline()
    for second in range(100, 110):
        for _ in range(10):
            t.record(second + 0.5, "ResolveCard pan", 2.0, lookups=1, failed=False, expected_error=False)
        t.record(second + 0.1, "ResolveCard pan [NOT_FOUND]", 3.0, lookups=1, failed=False, expected_error=True)
        t.record(second + 0.2, "BatchResolve", 30.0, lookups=100, failed=False, expected_error=False)
    t.record(105.3, "ResolveCard pan", 900.0, lookups=1, failed=True, expected_error=False,
             failure_kind="UNAVAILABLE")
    w = t.window(102, 107)
    assert (w.calls, w.lookups, w.failures, w.expected_errors) == (5 * 12 + 1, 5 * 111, 1, 5)
    assert w.failure_kinds == {"UNAVAILABLE": 1}
    assert w.error_rate == pytest.approx(1 / 61)
    assert t.per_second(108, 112) == [111, 111, 0, 0]
    assert t.everything().calls == 10 * 12 + 1
    merged = Timeline.from_json(json.loads(json.dumps(t.to_json()))).merge(t)
    assert merged.window(102, 107).lookups == 2 * w.lookups
    assert WindowStats.from_json(w.to_json()).latency().summary() == w.latency().summary()


def test_coefficient_of_variation() -> None:
    assert coefficient_of_variation([10, 10, 10]) == 0
    assert coefficient_of_variation([5, 15]) == pytest.approx(0.5)
    assert math.isnan(coefficient_of_variation([3]))


# -- sweep rows --------------------------------------------------------------------------------------
def run(nodes: int, lookups: int, node_cpu: float, *, label: str = "sweep", mix: str = "retail=100",
        wall: float = 10.0, failures: int = 0, redis_cpu: float = 0.2, offered: float = 0.0, pg_cpu: float = 0.05,
        shards: int = 2, series: str = "nodes", idle: tuple[float, float, float] = (0.0, 0.0, 0.0),
        idle_s: float = 0.0) -> RunResult:
    return RunResult(label=label, mix=mix, nodes=nodes, shards=shards, node_cpus=nodes, locust_workers=1, users=32,
                     wall_s=wall, lookups=lookups, calls=lookups, failures=failures, expected_errors=lookups // 50,
                     latency_ms={"p50": 1.0, "p95": 2.0, "p99": 4.0, "max": 9.0, "mean": 1.2, "n": float(lookups)},
                     node_cpu_s=node_cpu, redis_cpu_s=redis_cpu, pg_cpu_s=pg_cpu,
                     tiers={"l1": lookups // 2, "l2": lookups // 2 - lookups // 10, "l3": lookups // 10},
                     per_second=[lookups // 10] * 10, redis_keys=1000, redis_bytes=400_000,
                     offered_calls_per_s=offered, series=series, idle_s=idle_s, node_idle_cpu_s=idle[0],
                     redis_idle_cpu_s=idle[1], pg_idle_cpu_s=idle[2])


def test_derived_figures() -> None:
    r = run(1, 20_000, 9.0)
    assert r.throughput == 2000
    assert r.node_cpu_per_1k == pytest.approx(0.45)      # 9 CPU-s / 20k lookups x 1000
    assert r.redis_cpu_per_1k == pytest.approx(0.01)
    assert r.node_cores_busy == pytest.approx(0.9) and r.saturated
    assert r.miss_ratio == pytest.approx(0.1) and r.l1_ratio == pytest.approx(0.5)
    assert r.redis_ops_per_lookup == pytest.approx(0.6)   # 50% past L1 + 10% SETs after a miss
    assert r.bytes_per_key == 400
    assert math.isnan(run(1, 0, 1.0).node_cpu_per_1k)
    assert math.isnan(r.redis_commands_per_lookup)           # not measured (a report from before)
    counted = run(1, 20_000, 9.0)
    counted.redis_commands, counted.redis_reads = 16_000, 12_000
    assert counted.redis_commands_per_lookup == pytest.approx(0.8) and counted.redis_reads_per_lookup == 0.6


def test_scaling_efficiency_and_linearity() -> None:
    rows = scaling([run(4, 76_000, 36.0), run(1, 20_000, 9.0), run(2, 39_000, 18.4)])
    assert [r.run.nodes for r in rows] == [1, 2, 4]
    assert [round(r.efficiency, 3) for r in rows] == [1.0, 0.975, 0.95]
    assert rows[1].cpu_ratio == pytest.approx((18.4 / 39_000) / (9.0 / 20_000))
    assert all(r.linear == "LINEAR" for r in rows)
    assert ideal_line([r.run for r in rows]) == [(1, 2000.0), (2, 4000.0), (4, 8000.0)]
    text = verdict(rows)
    assert "LINEAR" in text and "NOT LINEAR" not in text and "efficiency at 4 nodes 0.95" in text


def test_not_linear_and_not_saturated() -> None:
    rows = scaling([run(1, 20_000, 9.0), run(2, 20_000, 11.0)])   # same load, 22% more CPU per lookup
    assert rows[1].linear == "NOT LINEAR"
    assert rows[1].efficiency == pytest.approx(0.5)
    assert "NOT LINEAR" in verdict(rows) and "not meaningful" in verdict(rows)
    paced = scaling([run(1, 6_000, 3.0, offered=600), run(2, 12_000, 6.1, offered=1200)])
    assert "paced at the same load per node" in verdict(paced)
    assert verdict(scaling([run(1, 10, 1.0)])).startswith("one configuration")


def test_a_smallest_size_above_one_is_the_baseline() -> None:
    rows = scaling([run(2, 40_000, 18.0), run(8, 150_000, 70.0)])
    assert rows[1].efficiency == pytest.approx(150_000 / (4 * 40_000))


def test_outputs_agree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runs = [run(1, 20_000, 9.0, label="calibrate:retail"), run(1, 20_000, 9.0), run(2, 39_000, 18.4),
            run(1, 500, 0.4, label="light")]
    machine = {"name": "test box", "date": "today", "cores": 2}
    config = {"nodes": "1,2"}
    report = to_json(runs, machine, config)
    text = json.dumps(report)   # strict JSON: no NaN
    assert "NaN" not in text
    back = runs_from_report(json.loads(text))
    assert [(r.label, r.nodes, r.lookups) for r in back] == [(r.label, r.nodes, r.lookups) for r in runs]
    sweep_rows = [d for d in report["runs"] if d["label"] == "sweep"]
    assert sweep_rows[1]["derived"]["efficiency"] == pytest.approx(0.975)
    rows = list(csv.DictReader(io.StringIO(to_csv(runs))))
    assert [row["label"] for row in rows] == ["calibrate:retail", "sweep", "sweep", "light"]
    assert float(rows[2]["efficiency"]) == pytest.approx(0.975) and rows[0]["efficiency"] == ""
    assert float(rows[1]["node_cpu_per_1k"]) == pytest.approx(0.45)
    md = markdown(runs, machine, config)
    assert "test box" in md and "| 2 | 2 | closed loop | 3,900 | 0.97 |" in md
    assert "calibrate" not in md.split("## Per-scenario")[0]
    assert "| retail | 1 | 2,000 |" in md and "Light load" in md
    with pytest.raises(ValueError):
        runs_from_report({"schema": "something else"})
    if plot(runs, str(tmp_path / "p.png")):
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# -- CPU layout -----------------------------------------------------------------------------------------
def test_layout_on_two_cores_shares() -> None:
    lay = plan_layout([0, 1], nodes=2, shards=2)
    assert (lay.mode, lay.nodes, lay.backends, lay.locust, lay.workers) == ("shared", (0,), (0,), (1,), 1)
    assert "shared" in lay.describe()


def test_layout_on_sixteen_cores_is_dedicated() -> None:
    lay = plan_layout(range(16), nodes=8, shards=2)
    assert lay.mode == "dedicated"
    assert lay.nodes == tuple(range(8)) and lay.backends == (8,) and lay.locust == tuple(range(9, 16))
    assert lay.workers == 7
    one = plan_layout(range(16), nodes=1, shards=4)
    assert one.nodes == (0,) and one.backends == (1, 2) and one.workers == 13
    assert plan_layout(range(16), nodes=1, shards=1, locust_workers=4).workers == 4


def test_layout_off() -> None:
    assert plan_layout([0, 1], 1, 1, pin=False).mode == "off"
    assert plan_layout([0], 1, 1).mode == "off"


def test_calibration_users() -> None:
    assert calibration_users("retail", 32) == 32
    assert calibration_users("batch", 32) == 4
    assert calibration_users("stream", 32) == 8
    assert calibration_users("batch", 4) == 2


# -- paced series: nodes and shards, every tier against the tolerance ---------------------------------------
def paced_series() -> list[RunResult]:
    """Nodes 1 -> 8 at 100 calls/s per node, then shards 1 -> 16 at 4 nodes (400 calls/s): round numbers."""
    return [
        run(1, 1_000, 0.60, offered=100, redis_cpu=0.030, pg_cpu=0.010),
        run(2, 2_000, 1.24, offered=200, redis_cpu=0.062, pg_cpu=0.020),
        run(8, 7_600, 4.9, offered=800, redis_cpu=0.250, pg_cpu=0.0684),    # 0.95 efficiency, PG 0.9x
        run(4, 4_000, 2.4, offered=400, redis_cpu=0.120, pg_cpu=0.040, shards=1, series="shards"),
        run(4, 4_000, 2.4, offered=400, redis_cpu=0.132, pg_cpu=0.040, shards=16, series="shards"),   # 1.10x
        run(4, 4_000, 2.4, offered=400, redis_cpu=0.180, pg_cpu=0.040, shards=8, series="shards"),    # 1.5x
    ]


def test_series_are_compared_with_their_own_smallest_size() -> None:
    groups = by_series([*paced_series(), run(1, 500, 0.3, label="light")])
    assert list(groups) == ["nodes", "shards"] and len(groups["nodes"]) == 3 and len(groups["shards"]) == 3
    nodes = scaling(groups["nodes"])
    assert [r.size for r in nodes] == [1, 2, 8]
    assert nodes[1].cpu_ratio == pytest.approx(1.24 / 2 / 0.6)                # 1.033
    assert nodes[2].efficiency == pytest.approx(0.95)                         # 7,600 of 8 x 1,000
    assert nodes[2].pg_cpu_ratio == pytest.approx(0.9)
    assert [r.verdict for r in nodes] == ["PASS", "PASS", "PASS"]
    shards = scaling(groups["shards"])
    assert [r.size for r in shards] == [1, 8, 16]                             # ordered by shards
    assert [round(r.redis_cpu_ratio, 3) for r in shards] == [1.0, 1.5, 1.1]
    assert [r.efficiency for r in shards] == [1.0, 1.0, 1.0]                  # same offered load: same ideal
    assert [r.verdict for r in shards] == ["PASS", "FAIL", "PASS"]            # 1.10x is on the edge: passes
    assert ideal_line(groups["shards"]) == [(1, 400.0), (8, 400.0), (16, 400.0)]


def test_within_tolerance_and_verdict_names_the_failing_tier() -> None:
    assert within(1.1) == "PASS" and within(0.9) == "PASS" and within(1.11) == "FAIL" and within(0.89) == "FAIL"
    assert within(math.nan) == "N/A"
    nodes_text = verdict(scaling(by_series(paced_series())["nodes"]))
    assert "node CPU per lookup stays within +-10% of the 1-node cost" in nodes_text
    assert "Redis CPU per lookup within" in nodes_text and "PostgreSQL CPU per lookup within" in nodes_text
    assert "paced at the same load per node, 8 nodes answered 0.95x" in nodes_text
    shards_text = verdict(scaling(by_series(paced_series())["shards"]))
    assert "of the 1-shard cost" in shards_text
    assert "Redis CPU per lookup beyond +-10% (worst 1.50x at 8 shards): FAIL" in shards_text


def test_idle_window_splits_fixed_and_load_driven_cost() -> None:
    # 10 s at 1,000 lookups/s used 6 CPU-s; at rest the nodes used 0.05 CPU-s/s: 0.5 CPU-s of the window
    r = run(1, 10_000, 6.0, idle=(0.25, 0.01, 0.02), idle_s=5.0)
    assert r.idle_cores("node") == pytest.approx(0.05)
    assert r.load_cpu_per_1k("node") == pytest.approx((6.0 - 0.5) / 10)
    assert r.idle_cores("redis") == pytest.approx(0.002)
    assert r.load_cpu_per_1k("pg") == pytest.approx((0.05 - 0.04) / 10)
    assert math.isnan(run(1, 10_000, 6.0).idle_cores("node"))                 # no idle window: no figure


def test_two_series_in_every_output(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runs = paced_series()
    runs[0] = run(1, 1_000, 0.60, offered=100, redis_cpu=0.030, pg_cpu=0.010, idle=(0.1, 0.01, 0.01), idle_s=5)
    report = json.loads(json.dumps(to_json(runs, {"name": "box"}, {})))
    assert set(report["verdicts"]) == {"nodes", "shards"} and report["verdict"] == report["verdicts"]["nodes"]
    back = runs_from_report(report)
    assert [(r.series, r.nodes, r.shards) for r in back] == [(r.series, r.nodes, r.shards) for r in runs]
    assert back[0].idle_s == 5 and back[0].node_idle_cpu_s == 0.1
    by_shards = {d["shards"]: d["derived"] for d in report["runs"] if d["series"] == "shards"}
    assert by_shards[8]["verdict"] == "FAIL" and by_shards[8]["redis_cpu_ratio"] == pytest.approx(1.5)
    rows = list(csv.DictReader(io.StringIO(to_csv(runs))))
    assert [(row["series"], row["verdict"]) for row in rows][3:] == [("shards", "PASS"), ("shards", "PASS"),
                                                                      ("shards", "FAIL")]
    assert float(rows[0]["node_idle_cores"]) == pytest.approx(0.02) and rows[1]["node_idle_cores"] == ""
    md = markdown(runs, {"name": "box"}, {}, notes=["No 16-core machine this time."])
    assert "## Nodes grow, 2 shard(s) fixed" in md and "## Redis shards grow, 4 node(s) fixed" in md
    assert "No 16-core machine this time." in md
    assert "| 8 | 4 | 400 | 400 | 1.00 |" in md and "0.045 (1.50x FAIL)" in md and "**FAIL**" in md
    assert "Fixed and load-driven cost" in md
    old = json.loads(json.dumps(report))
    for d in old["runs"]:   # a report written before the series existed reads as one nodes series
        del d["series"]
    assert {r.series for r in runs_from_report(old)} == {"nodes"}
    if plot(runs, str(tmp_path / "p.png")):
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_paced_spec_gives_every_size_the_same_load_and_users_per_node() -> None:
    for nodes in (1, 2, 4, 8):
        spec = paced_spec("nodes", "retail=100", nodes=nodes, per_node_rate=100, users_per_node=16, workers=1)
        users = spec.users_per_worker * spec.workers
        assert users == 16 * nodes
        assert spec.user_rate * users == pytest.approx(100 * nodes)
    two = paced_spec("shards", "retail=100", nodes=3, per_node_rate=100, users_per_node=5, workers=2)
    assert (two.users_per_worker, two.workers, two.series) == (8, 2, "shards")   # 15 users round up to 16
    assert two.user_rate * 16 == pytest.approx(300)


def test_rounds_of_a_size_are_pooled() -> None:
    """Three rounds of the 2-node size (node CPU per 1k 0.5, 0.6, 0.7) pool to their sums: 1.8 CPU-s over 3,000
    lookups = 0.6, spread (0.7 - 0.5) / 0.6; latency percentiles the median of the rounds'."""
    base = run(1, 1_000, 0.5, offered=100)
    rounds = [run(2, 1_000, cpu, offered=200) for cpu in (0.5, 0.7, 0.6)]
    for i, r in enumerate(rounds, 1):
        r.round = i
        r.latency_ms = {"p50": float(i), "p99": 10.0 * i}
    rows = scaling([base, *rounds])
    assert [r.size for r in rows] == [1, 2]
    two = rows[1].run
    assert (two.round, two.lookups, two.wall_s) == (0, 3_000, 30.0)
    assert two.node_cpu_per_1k == pytest.approx(0.6) and rows[1].cpu_ratio == pytest.approx(1.2)
    assert spread(two) == pytest.approx(0.2 / 0.6)
    assert two.latency_ms == {"p50": 2.0, "p99": 20.0}
    assert math.isnan(spread(base))
    lines = list(csv.DictReader(io.StringIO(to_csv([base, *rounds]))))
    assert [row["round"] for row in lines] == ["1", "1", "2", "3", "pooled"]
    assert lines[1]["verdict"] == "" and lines[-1]["verdict"] == "FAIL"
    report = to_json([base, *rounds], {}, {})
    assert [d["nodes"] for d in report["sizes"]] == [1, 2]
    assert "| 3 (33%) |" in markdown([base, *rounds], {}, {})


def test_probe_comparison_lines_up_windows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from loadtests.sweep.probe import compare

    small, big = run(1, 1_000, 0.5, offered=100), run(8, 8_000, 6.0, offered=800)
    small.started_at, big.started_at = 1000.0, 2000.0
    (tmp_path / "sweep.json").write_text(json.dumps(to_json([small, big], {}, {})))
    lines = [{"t": 1000 + i, "jobs": 20, "cpu_us_median": 1000.0} for i in range(10)]
    lines += [{"t": 2000 + i, "jobs": 20, "cpu_us_median": 1200.0} for i in range(10)]
    lines += [{"t": 2010, "jobs": 20, "cpu_us_median": 9999.0}]            # after the window: ignored
    (tmp_path / "probe.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = compare(str(tmp_path / "probe.jsonl"), str(tmp_path / "sweep.json")).splitlines()
    assert "(1.00x), probe 1000 us/job (1.00x)" in text[0]
    assert "8 node(s) 2 shard(s): node CPU 0.750 CPU-s/1k (1.50x), probe 1200 us/job (1.20x)" in text[1]


def test_a_closed_loop_per_node_gives_each_size_users_in_proportion() -> None:
    """The first 16-core run gave 1 node 672 users (48 on each of 14 workers): its calls queued past their
    deadlines. Users per node: 12 x n users, no worker without one, no pacing."""
    one = paced_spec("nodes", "batch=100", nodes=1, per_node_rate=0.0, users_per_node=12, workers=14)
    assert (one.workers, one.users_per_worker, one.user_rate) == (12, 1, 0.0)
    eight = paced_spec("nodes", "batch=100", nodes=8, per_node_rate=0.0, users_per_node=12, workers=6)
    assert (eight.workers, eight.users_per_worker) == (6, 16)
    args = parse_args(["--users-per-node", "12"])
    assert args.closed_users_per_node == 12
    assert parse_args([]).closed_users_per_node == 0 and parse_args([]).users_per_node == 16
    paced = parse_args(["--per-node-rate", "50", "--users-per-node", "8"])
    assert (paced.closed_users_per_node, paced.users_per_node) == (0, 8)


def test_cpus_are_handed_out_one_per_physical_core_first(tmp_path: Path) -> None:
    """16 CPUs on 8 cores, siblings n and n+8 (as Linux numbers most SMT machines): nodes 0..3 get four
    whole cores, not two cores' two threads each."""
    for cpu in range(16):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        topo.joinpath("thread_siblings_list").write_text(f"{cpu % 8},{cpu % 8 + 8}\n")
    groups = sibling_sets(range(16), root=tmp_path)
    assert groups[:2] == [(0, 8), (1, 9)] and len(groups) == 8
    order = cores_first(groups)
    assert order == [*range(8), *range(8, 16)]
    assert "16 CPUs on 8 cores" in describe_topology(groups)
    adjacent = [(0, 1), (2, 3), (4, 5)]   # the other numbering: siblings side by side
    assert cores_first(adjacent) == [0, 2, 4, 1, 3, 5]
    assert plan_layout(cores_first(adjacent), nodes=2, shards=1).nodes == (0, 2)
    assert sibling_sets([0, 1], root=tmp_path / "absent") == [(0,), (1,)]
    assert describe_topology([(0,), (1,)]) == "2 CPUs, one thread per core"
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]


def test_rerender_keeps_the_notes_or_takes_the_ones_given(tmp_path: Path) -> None:
    """--rerender rewrites the report from sweep.json: with no --note it keeps the notes stored there,
    with --note paragraphs they replace them (a re-run's notes were otherwise lost, or needed a new run)."""
    committed = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "sweep" / "sweep.json"
    report = json.loads(committed.read_text())
    report["notes"] = ["the stored note"]
    (tmp_path / "sweep.json").write_text(json.dumps(report))
    assert rerender(tmp_path, []) == 0
    assert "the stored note" in (tmp_path / "README.md").read_text()
    assert rerender(tmp_path, ["a new note", "and a second"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "a new note" in text and "and a second" in text and "the stored note" not in text
    assert json.loads((tmp_path / "sweep.json").read_text())["notes"] == ["a new note", "and a second"]
    assert rerender(tmp_path, []) == 0
    assert "a new note" in (tmp_path / "README.md").read_text()
