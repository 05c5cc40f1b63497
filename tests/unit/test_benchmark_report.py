"""The benchmark's arithmetic (loadtests/bench/report.py): percentiles, per-core rates, ratios, targets."""

from __future__ import annotations

import json
import math

import pytest

from loadtests.bench.report import (
    PhaseResult,
    ceiling_per_core,
    ceilings_line,
    console_table,
    evaluate_targets,
    half_load_line,
    latency_summary,
    markdown,
    merge_rounds,
    percentile,
    ratio_to,
    to_json,
)


def phase(key: str, items: int, server_cpu_s: float, *, wall_s: float = 5.0, unit: str = "lookups") -> PhaseResult:
    return PhaseResult(key=key, title=key, unit=unit, server="test", items=items, calls=items, errors=0,
                       wall_s=wall_s, server_cpu_s=server_cpu_s, backend_cpu_s=1.0, client_cpu_s=4.0,
                       latency_ms={"p50": 1.0, "p99": 2.0}, idle_latency_ms={"p50": 0.3, "p99": 0.5})


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]   # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary([0.003, 0.001, 0.002])
    assert summary["p50"] == pytest.approx(2.0)
    assert summary["max"] == pytest.approx(3.0)
    assert summary["n"] == 3
    assert math.isnan(latency_summary([])["p50"])


def test_rates_per_wall_second_and_per_server_cpu_second() -> None:
    r = phase("l1", items=20_000, server_cpu_s=4.0, wall_s=5.0)
    assert r.wall_rate == 4_000
    assert r.per_core == 5_000            # the server was busy 80% of the window
    assert r.server_util == pytest.approx(0.8)
    assert r.all_in_per_core == 4_000     # one more CPU-second of Redis/PostgreSQL
    assert r.server_us_per_item == pytest.approx(200.0)
    assert r.client_util == pytest.approx(0.8)


def test_zero_cpu_gives_nan_not_a_crash() -> None:
    r = phase("l1", items=10, server_cpu_s=0.0)
    assert math.isnan(r.per_core)
    assert math.isnan(r.server_us_per_item)


def raw_round(items: int, server_cpu_s: float, latencies: list[float]) -> dict[str, object]:
    return {"items": items, "calls": items // 10, "errors": 0, "wall_s": 2.0, "server_cpu_s": server_cpu_s,
            "backend_cpu_s": 0.5, "client_cpu_s": 1.5, "latency_s": latencies, "idle_latency_s": [0.0004],
            "tiers": {"l1": items - 5, "l2": 5}}


def test_rounds_are_pooled_and_their_spread_is_the_noise() -> None:
    r = merge_rounds([raw_round(4_400, 1.0, [0.001, 0.003]), raw_round(3_600, 1.0, [0.002])],
                     key="l1", title="t", unit="lookups", server="node", load="aio")
    assert (r.items, r.calls, r.wall_s, r.server_cpu_s, r.backend_cpu_s) == (8_000, 800, 4.0, 2.0, 1.0)
    assert r.pooled_per_core == 4_000               # pooled, not the mean of the rates
    assert r.per_core == 4_400                      # the best round: interference only slows things down
    assert r.server_us_per_item == pytest.approx(1e6 / 4_400)
    assert r.round_per_core == [4_400, 3_600]
    assert r.spread == pytest.approx(0.1)
    assert r.latency_ms["p50"] == pytest.approx(2.0) and r.latency_ms["n"] == 3
    assert r.tiers == {"l1": 7_990, "l2": 10}
    one = merge_rounds([raw_round(4_400, 1.0, [])], key="l1", title="t", unit="lookups", server="node")
    assert math.isnan(one.spread)
    with pytest.raises(ValueError):
        merge_rounds([], key="l1", title="t", unit="lookups", server="node")


def test_ceiling_is_the_echo_phase() -> None:
    assert ceiling_per_core({"echo": phase("echo", 4_400, 1.0)}) == 4_400
    assert math.isnan(ceiling_per_core({}))


def test_targets_use_per_core_ratios() -> None:
    results = {
        "echo": phase("echo", 4_000, 1.0),
        "echo_sync": phase("echo_sync", 6_000, 1.0),
        "l1": phase("l1", 3_700, 1.0),                        # 0.925x echo: miss (>= 1.3)
        "l1_hybrid": phase("l1_hybrid", 5_200, 1.0),          # 1.3x echo: pass; 0.867x sync echo: pass
        "l2": phase("l2", 2_000, 1.0, wall_s=1.0),           # 0.5x: miss, whatever the wall rate
        "batch": phase("batch", 140_000, 1.0, unit="keys"),   # exactly 35x echo calls: pass
        # stream missing: N/A
    }
    assert ratio_to(results, "l1", "ceiling") == pytest.approx(0.925)
    assert ratio_to(results, "batch", "ceiling") == pytest.approx(35.0)
    assert math.isnan(ratio_to(results, "stream", "l1"))
    verdicts = {t.name: t.status for t in evaluate_targets(results)}
    assert verdicts["[aio] near-cache hit vs grpc.aio echo"] == "MISS"
    assert verdicts["[hybrid] near-cache hit vs grpc.aio echo"] == "PASS"
    assert verdicts["[hybrid] near-cache hit vs sync grpc.server echo"] == "PASS"
    assert verdicts["[aio] Redis hit vs grpc.aio echo"] == "MISS"
    assert verdicts["[aio] BatchResolve(100) keys vs grpc.aio echo calls"] == "PASS"
    assert verdicts["[aio] StreamResolve vs unary near-cache lookups"] == "N/A"
    assert verdicts["[hybrid] Redis hit vs grpc.aio echo"] == "N/A"


def test_latency_target_is_an_upper_bound_in_milliseconds() -> None:
    paced = phase("l1_half", 2_000, 1.0)
    paced.latency_ms = {"p99": 1.5}
    slow = phase("l1_half_hybrid", 2_000, 1.0)
    slow.latency_ms = {"p99": 2.5}
    by_phase = {t.phase: t for t in evaluate_targets({"l1_half": paced, "l1_half_hybrid": slow})
                if t.baseline == "p99 ms"}
    assert by_phase["l1_half"].ratio == 1.5 and by_phase["l1_half"].status == "PASS"
    assert by_phase["l1_half_hybrid"].status == "MISS"


def test_marginal_when_within_the_measured_noise() -> None:
    echo = phase("echo", 4_000, 1.0)
    echo.round_per_core = [4_200, 3_800]                    # +-5% between rounds
    results = {"echo": echo, "l1": phase("l1", 5_200, 1.0), "l2": phase("l2", 2_000, 1.0)}
    by_name = {t.name: t for t in evaluate_targets(results)}
    hit, redis = by_name["[aio] near-cache hit vs grpc.aio echo"], by_name["[aio] Redis hit vs grpc.aio echo"]
    assert hit.ratio == pytest.approx(5_200 / 4_200)                       # against the best echo round
    assert hit.status == "MISS" and hit.marginal                           # 1.238 vs 1.3: within 5%
    assert hit.verdict == "MISS (marginal)"
    assert redis.status == "MISS" and not redis.marginal                   # 0.48 vs 1.0


def test_outputs_agree_and_json_has_no_nan() -> None:
    results = [phase("echo", 4_000, 1.0), phase("l1", 3_000, 1.0), phase("stream", 9_000, 1.0)]
    targets = evaluate_targets({r.key: r for r in results})
    machine = {"date": "2024-01-01", "cpu_model": "Test CPU", "cores": 2}
    text = console_table(results, targets)
    assert "MISS" in text and "0.75x" in text and "per-server-core" in text
    md = markdown(results, targets, machine, {"seconds": 5})
    assert "| Test CPU |" in md and "**MISS**" in md and "**PASS**" in md
    doc = to_json(results, targets, machine, {"seconds": 5})
    encoded = json.dumps(doc, allow_nan=False)          # NaN would raise here
    assert json.loads(encoded)["phases"][1]["ratio_to_ceiling_per_core"] == pytest.approx(0.75)
    assert doc["phases"][0]["spread"] is None           # one round: unknown, and null rather than NaN


def test_stream_ceilings_are_each_echo_streams_over_its_own_unary_calls() -> None:
    results = {r.key: r for r in (phase("echo", 10_000, 1.0), phase("echo_stream", 25_000, 1.0),
                                  phase("echo_sync", 15_000, 1.0), phase("echo_sync_stream", 30_000, 1.0),
                                  phase("stream_hybrid", 27_000, 1.0), phase("l1_hybrid", 12_000, 1.0))}
    assert ceilings_line(results) == ("Ceilings, per server core: grpc.aio echo's own streams 2.50x its unary "
                                      "calls; sync grpc.server echo's own streams 2.00x its unary calls (the "
                                      "node on it: 2.25x).")
    assert ceilings_line({"echo": results["echo"]}) == ""     # the echo stream phases did not run


def test_the_half_load_p99_is_shown_per_round_next_to_its_bare_server() -> None:
    """The p99 target pools every round's calls, so one stalled round made the whole figure; each
    round's p99 is now printed with the bare gRPC server's, paced alike in the same rounds."""
    def rounds(key: str, *p99s_ms: float) -> PhaseResult:
        raws = [{"items": 100, "calls": 100, "wall_s": 1.0, "server_cpu_s": 0.5,
                 "latency_s": [0.001] * 98 + [p99 / 1000] * 2} for p99 in p99s_ms]
        return merge_rounds(raws, key=key, title=key, unit="lookups", server="test")

    results = {r.key: r for r in (rounds("l1_half_hybrid", 5.7, 9.6, 30.1), rounds("echo_sync_half", 5.3, 5.4, 6.3),
                                  rounds("l1_half", 4.0))}
    assert results["l1_half_hybrid"].round_p99_ms == pytest.approx([5.7, 9.6, 30.1])
    line = half_load_line(results)
    assert line == ("p99 at half of saturation, per round: [aio] node 4.00 ms; [hybrid] node 5.70 / 9.60 / 30.10 ms,"
                    " the bare sync grpc.server echo 5.30 / 5.40 / 6.30 ms.")
    assert half_load_line({"l1": results["l1_half"]}) == ""
    report = markdown(list(results.values()), evaluate_targets(results), {}, {})
    assert line in report and line in console_table(list(results.values()), evaluate_targets(results))
    doc = json.loads(json.dumps(to_json(list(results.values()), evaluate_targets(results), {}, {})))
    assert [p["round_p99_ms"] for p in doc["phases"] if p["key"] == "echo_sync_half"] == [[5.3, 5.4, 6.3]]
