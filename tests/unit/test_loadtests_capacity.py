"""The capacity model (loadtests/sweep/capacity.py) against sweep reports: a synthetic one with round numbers,
and the committed docs/benchmarks/sweep/sweep.json."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from loadtests.sweep.capacity import DEFAULT_REPORT, KEYS_PER_CUSTOMER, Request, cmd_capacity, costs_from_report, plan
from loadtests.sweep.report import RunResult, runs_from_report, to_json


def _run(label: str, mix: str, nodes: int, lookups: int, node_cpu: float, redis_cpu: float, pg_cpu: float,
         l3: int, p99: float = 5.0) -> RunResult:
    return RunResult(label=label, mix=mix, nodes=nodes, shards=2, node_cpus=nodes, locust_workers=1, users=32,
                     wall_s=10.0, lookups=lookups, calls=lookups, failures=0, expected_errors=0,
                     latency_ms={"p50": p99 / 4, "p95": p99 / 2, "p99": p99, "max": p99 * 2, "mean": p99 / 3,
                                 "n": float(lookups)},
                     node_cpu_s=node_cpu, redis_cpu_s=redis_cpu, pg_cpu_s=pg_cpu,
                     tiers={"l1": lookups // 2, "l2": lookups // 2 - l3, "l3": l3}, redis_keys=10_000,
                     redis_bytes=5_000_000)


def synthetic_report(penalty: float = 1.0) -> dict:  # type: ignore[type-arg]
    # retail: 0.5 ms node CPU per lookup; ach: 1.0 ms; Redis 0.02 / 0.04 ms; PostgreSQL 0.01 ms; misses 1% / 2%
    runs = [
        _run("calibrate:retail", "retail", 1, 20_000, 10.0, 0.4, 0.2, 200),
        _run("calibrate:ach", "ach", 1, 10_000, 10.0, 0.4, 0.1, 200),
        _run("light", "retail=100", 1, 1_000, 0.5, 0.02, 0.01, 10, p99=2.0),
        _run("sweep", "retail=100", 1, 20_000, 10.0, 0.4, 0.2, 200),
        _run("sweep", "retail=100", 2, 40_000, 20.0 * penalty, 0.8, 0.4, 400),
    ]
    return json.loads(json.dumps(to_json(runs, {"name": "synthetic", "date": "d"}, {})))


def test_costs_come_from_the_calibration_runs() -> None:
    costs = costs_from_report(synthetic_report())
    assert costs.scenarios["retail"].node_cpu_s == pytest.approx(0.0005)
    assert costs.scenarios["ach"].node_cpu_s == pytest.approx(0.001)
    assert costs.scenarios["ach"].miss_ratio == pytest.approx(0.02)
    assert costs.scaling_penalty == 1.0
    assert costs.bytes_per_key == 500
    assert costs.light_p99_ms == 2.0


def test_nodes_shards_and_postgres_for_a_target() -> None:
    costs = costs_from_report(synthetic_report())
    ans = plan(Request(target=10_000, mix={"retail": 0.5, "ach": 0.5}, p99_budget_ms=20, cores_per_pod=4,
                       headroom=0.3, customers=1_000_000, shard_memory_gb=1.0, zones=1), costs)
    assert ans.node_cores == pytest.approx(7.5)                       # 10k x (0.5 x 0.5 + 0.5 x 1.0) ms
    assert ans.latency_cap == pytest.approx(0.9)                      # 1 - 2 ms / 20 ms
    assert ans.utilisation_cap == pytest.approx(0.7)                  # headroom is the tighter limit
    assert ans.processes == math.ceil(7.5 / 0.7) == 11
    assert ans.pods == 3
    assert ans.redis_gb == pytest.approx(1_000_000 * KEYS_PER_CUSTOMER * 500 / 1e9)
    assert ans.shards_for_memory == math.ceil(3.25 / 0.7) == 5
    assert ans.redis_cores == pytest.approx(0.3)                      # 10k x (0.02 + 0.04) / 2 ms
    assert ans.shards_for_ops == 1 and ans.shards == 5
    assert ans.miss_ratio == pytest.approx(0.015)
    assert ans.pg_reads_per_s == pytest.approx(150)
    assert ans.pg_cores == pytest.approx(0.1)
    assert ans.feasible


def test_tight_latency_budget_lowers_utilisation_and_impossible_budget_is_reported() -> None:
    costs = costs_from_report(synthetic_report())
    tight = plan(Request(target=10_000, mix={"retail": 1.0}, p99_budget_ms=4, headroom=0.1, zones=1), costs)
    assert tight.utilisation_cap == pytest.approx(0.5)                # 1 - 2/4 < 1 - 0.1
    assert tight.processes == 10                                      # 5 cores at <= 50 %
    impossible = plan(Request(target=10_000, mix={"retail": 1.0}, p99_budget_ms=1.5), costs)
    assert not impossible.feasible and "below the light-load p99" in impossible.notes[0]


def test_scaling_penalty_from_the_sweep_is_applied() -> None:
    costs = costs_from_report(synthetic_report(penalty=1.25))
    assert costs.scaling_penalty == pytest.approx(1.25)
    ans = plan(Request(target=10_000, mix={"retail": 1.0}, p99_budget_ms=100, headroom=0.0), costs)
    assert ans.node_cores == pytest.approx(5 * 1.25)


def test_unmeasured_scenario_and_bad_input() -> None:
    costs = costs_from_report(synthetic_report())
    with pytest.raises(ValueError, match="--calibrate batch"):
        plan(Request(target=1000, mix={"batch": 1.0}, p99_budget_ms=10), costs)
    with pytest.raises(ValueError):
        plan(Request(target=0, mix={"retail": 1.0}, p99_budget_ms=10), costs)
    with pytest.raises(ValueError):
        costs_from_report({"schema": "nope"})


# -- the committed report -------------------------------------------------------------------------------
def committed() -> dict:  # type: ignore[type-arg]
    return json.loads(DEFAULT_REPORT.read_text())


def test_committed_report_gives_every_scenario_a_cost() -> None:
    costs = costs_from_report(committed())
    assert set(costs.scenarios) >= {"retail", "ach", "customer", "batch", "stream"}
    for name, c in costs.scenarios.items():
        assert 0 < c.node_cpu_s < 0.01, name            # under 10 ms of node CPU per lookup
        assert 0 <= c.miss_ratio < 1
    assert costs.scenarios["batch"].node_cpu_s < costs.scenarios["retail"].node_cpu_s   # batching pays
    assert 50 < costs.bytes_per_key < 20_000
    assert costs.scaling_penalty >= 1


def test_model_reproduces_the_measured_runs() -> None:
    """Fed a calibration run's own load (no headroom, no latency limit, one zone), the model needs exactly
    the node CPU that run used, hence no more node processes than it had."""
    report = committed()
    costs = costs_from_report(report)
    for run in runs_from_report(report):
        if not run.label.startswith("calibrate:"):
            continue
        scenario = run.label.split(":", 1)[1]
        ans = plan(Request(target=run.throughput, mix={scenario: 1.0}, p99_budget_ms=1e9, headroom=0.0, zones=1),
                   costs)
        busy = run.node_cpu_s / run.wall_s
        assert ans.node_cores == pytest.approx(busy * costs.scaling_penalty, rel=1e-6), scenario
        assert ans.processes <= math.ceil(run.nodes * costs.scaling_penalty), scenario
        assert ans.pg_reads_per_s == pytest.approx(run.throughput * costs.scenarios[scenario].miss_ratio)


def test_cli_answers_from_the_committed_report(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtests.cli import build_parser

    args = build_parser().parse_args(["capacity", "--target", "20000", "--mix", "retail=80,ach=15,customer=5",
                                      "--p99-ms", "200", "--cores-per-pod", "4"])
    assert cmd_capacity(args) == 0
    out = capsys.readouterr().out
    assert "node processes" in out and "Redis" in out and "PostgreSQL" in out and "headroom 30%" in out
    bad = argparse.Namespace(**{**vars(args), "report": "/nonexistent/sweep.json"})
    assert cmd_capacity(bad) == 2


@pytest.mark.parametrize(("command", "prog"), [("sweep", "loadtests.sweep"), ("bench", "loadtests.bench")])
def test_crs_load_hands_sweep_and_bench_their_arguments(command: str, prog: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from loadtests.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: python -m {prog} " in capsys.readouterr().out


def test_penalties_per_tier_come_from_the_nodes_series() -> None:
    """Nodes series whose Redis CPU per lookup grew 1.5x and PostgreSQL 1.2x at 2 nodes: the plan carries
    those penalties into Redis cores (hence shards for load) and PostgreSQL cores. A shards series (fixed
    load, more shards) is reported in the linearity lines but sets no penalty."""
    base = synthetic_report()
    runs = [r for r in runs_from_report(base) if r.label != "sweep"]
    runs += [_run("sweep", "retail=100", 1, 20_000, 10.0, 0.4, 0.2, 200),
             _run("sweep", "retail=100", 2, 40_000, 20.0, 1.2, 0.48, 400)]

    def shard_run(shards: int, redis_cpu: float) -> RunResult:
        r = _run("sweep", "retail=100", 2, 40_000, 20.0, redis_cpu, 0.4, 400)
        r.series, r.shards = "shards", shards
        return r

    runs += [shard_run(1, 0.8), shard_run(16, 2.4)]   # 3x: each shard's fixed cost over the same load
    report = json.loads(json.dumps(to_json(runs, {"name": "synthetic", "date": "d"}, {})))
    costs = costs_from_report(report)
    assert costs.scaling_penalty == 1.0
    assert costs.redis_penalty == pytest.approx(1.5) and costs.pg_penalty == pytest.approx(1.2)
    assert set(costs.linearity) == {"nodes", "shards"} and "3.00x at 16 shards" in costs.linearity["shards"]
    ans = plan(Request(target=100_000, mix={"retail": 1.0}, p99_budget_ms=100, headroom=0.0), costs)
    assert ans.redis_cores == pytest.approx(100_000 * 0.00002 * 1.5)           # 3 cores
    assert ans.shards_for_ops == 3
    assert ans.pg_cores == pytest.approx(100_000 * 0.00001 * 1.2)
    assert ans.node_cores == pytest.approx(50)
    assert any("Redis CPU per lookup grew to 1.50x" in n for n in ans.notes)


@pytest.mark.parametrize("flag, value", [
    ("--miss-ratio", "2"), ("--miss-ratio", "-0.1"), ("--miss-ratio", "5%"), ("--miss-ratio", "nan"),
    ("--headroom", "1"), ("--headroom", "-0.2"), ("--target", "0"), ("--target", "inf"), ("--p99-ms", "0"),
    ("--cores-per-pod", "0"), ("--cores-per-pod", "2.5"), ("--shard-memory-gb", "-8"), ("--keys", "-1"),
    ("--customers", "-1"), ("--customers", "inf"),
])
def test_a_number_outside_its_range_is_refused_naming_the_flag(flag: str, value: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`--miss-ratio 2` used to plan PostgreSQL for twice the lookups; ratios and fractions are within
    [0, 1] (headroom below 1), counts and sizes finite and not negative."""
    from loadtests.cli import main

    with pytest.raises(SystemExit) as info:
        main(["capacity", "--target", "1000", flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: {value!r} is not a" in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag, value", [("--miss-ratio", "0"), ("--miss-ratio", "1"), ("--headroom", "0"),
                                         ("--keys", "0"), ("--customers", "0")])
def test_the_ends_of_each_range_are_accepted(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from loadtests.cli import main

    assert main(["capacity", "--target", "1000", "--p99-ms", "1000", flag, value]) == 0
    assert "node processes" in capsys.readouterr().out


def test_the_model_refuses_what_the_flags_refuse() -> None:
    """plan() is also called without the CLI (tests, notebooks): the same limits hold there."""
    costs = costs_from_report(synthetic_report())
    for bad in ({"miss_ratio": 2.0}, {"miss_ratio": math.nan}, {"keys": -1.0}, {"customers": math.inf}):
        with pytest.raises(ValueError):
            plan(Request(target=1000, mix={"retail": 1.0}, p99_budget_ms=10, **bad), costs)   # type: ignore[arg-type]


def test_a_report_that_cannot_be_read_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loadtests.cli import main

    (tmp_path / "list.json").write_text("[]")
    for report, said in ((tmp_path, "cannot read it"), (tmp_path / "list.json", "is not a sweep report")):
        assert main(["capacity", "--target", "1000", "--report", str(report)]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1, err


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("extra", [["--p99-ms", "1"], ["--p99-ms", "200"]])
def test_the_json_answer_is_standard_json(extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json is for other programs: a budget below the light-load p99 (latency cap nan) or a report
    without a light run or a Redis figure wrote NaN, which JSON has not (jq, JavaScript, Go refuse it).
    "No value" is null."""
    from loadtests.cli import main

    runs = [r for r in runs_from_report(synthetic_report()) if r.label != "light"]
    for r in runs:
        r.redis_keys = 0
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(to_json(runs, {"name": "synthetic", "date": "d"}, {})))
    for report in (str(DEFAULT_REPORT), str(bare)):
        main(["capacity", "--target", "1000", "--json", "--report", report, *extra])
        answer = _strict_json(capsys.readouterr().out)
        assert isinstance(answer, dict) and answer["request"]["target"] == 1000
    assert answer["latency_cap"] is None and answer["costs"]["bytes_per_key"] is None


def test_a_miss_ratio_the_sweep_did_not_measure_is_not_planned_as_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """A calibration run without tier counters (the nodes' /metrics could not be scraped: scrape_tiers
    skips what it cannot fetch) has no miss ratio. It was read as 0: "0 reads/s at a 0.00% cache-miss
    ratio", PostgreSQL planned for no load at all. Unmeasured, it is said so, and --miss-ratio plans it."""
    runs = runs_from_report(synthetic_report())
    for r in runs:
        if r.label == "calibrate:ach":
            r.tiers = {}
    costs = costs_from_report(json.loads(json.dumps(to_json(runs, {"name": "synthetic", "date": "d"}, {}))))
    ans = plan(Request(target=10_000, mix={"retail": 0.5, "ach": 0.5}, p99_budget_ms=20), costs)
    assert math.isnan(ans.pg_reads_per_s) and math.isnan(ans.miss_ratio)
    assert any("no cache-miss ratio for ach" in n and "--miss-ratio" in n for n in ans.notes), ans.notes
    from loadtests.sweep.capacity import render
    assert "0 reads/s" not in render(ans, costs, "r.json") and "not measured" in render(ans, costs, "r.json")
    given = plan(Request(target=10_000, mix={"retail": 0.5, "ach": 0.5}, p99_budget_ms=20, miss_ratio=0.05), costs)
    assert given.pg_reads_per_s == pytest.approx(500) and not any("cache-miss" in n for n in given.notes)
    retail_only = plan(Request(target=10_000, mix={"retail": 1.0}, p99_budget_ms=20), costs)
    assert retail_only.pg_reads_per_s == pytest.approx(100)


def test_the_nodes_survive_the_loss_of_a_zone() -> None:
    """The answer says the headroom is for "a lost zone", but 30% spare does not carry one zone of three:
    the two left run at 0.7 x 3/2 = 105% busy. With --zones Z (default 3) the pods are also sized so that
    those left after the loss of the zone holding the most of them stay within the latency cap (the p99
    budget still met), or under 100% busy where the report has no light run."""
    costs = costs_from_report(synthetic_report())
    req = dict(target=10_000, mix={"retail": 1.0}, p99_budget_ms=20, cores_per_pod=4, headroom=0.3)
    # 5 node cores; latency cap 0.9. Normal: ceil(5 / 0.7) = 8 processes, 2 pods. One zone of 3 lost: the
    # pods left must hold ceil(5 / 0.9) = 6 processes, i.e. 2 pods (8 cores) after losing ceil(p / 3).
    ans = plan(Request(**req), costs)   # type: ignore[arg-type]
    left = ans.pods - math.ceil(ans.pods / 3)
    assert left * 4 * 0.9 >= ans.node_cores, f"{left} pod(s) left of {ans.pods} for {ans.node_cores} cores"
    assert ans.request.zones == 3
    assert ans.pods == 3 and ans.processes == 12
    assert any("one of 3 zones" in n for n in ans.notes), ans.notes
    one = plan(Request(**req, zones=1), costs)   # type: ignore[arg-type]
    assert one.pods == 2 and one.processes == 8
    two = plan(Request(**req, zones=2), costs)   # type: ignore[arg-type]
    assert (two.pods - math.ceil(two.pods / 2)) * 4 * 0.9 >= two.node_cores and two.pods == 4
    with pytest.raises(ValueError):
        plan(Request(**req, zones=0), costs)   # type: ignore[arg-type]
