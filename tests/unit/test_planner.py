"""The migration planner (exact hash-space flows, key/byte plans from samples) and the pacer."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shard_router import Ring, ShardSpec
from shard_router.pacing import Pacer
from shard_router.planner import ShardSample, flows, moved_fraction, plan_moves


def ring(n: int, **weights: int) -> Ring:
    return Ring(ShardSpec(f"shard-{i}", weights.get(f"w{i}", 1)) for i in range(n))


def keys(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    return [f"crd:1:{rnd.getrandbits(128):032x}" for _ in range(n)]


# -- exact flows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 4, 10])
def test_flows_sum_to_one_and_a_ring_moves_nothing_to_itself(n: int) -> None:
    r = ring(n)
    f = flows(r, r)
    assert abs(sum(f.values()) - 1) < 1e-12
    assert all(a == b for a, b in f) and moved_fraction(r, r) == 0.0
    assert {a: v for (a, _), v in f.items()} == pytest.approx(r.share())


def test_growing_moves_exactly_the_new_shards_share_and_only_to_it() -> None:
    for n in (1, 2, 3, 7, 15):
        before, after = ring(n), ring(n + 1)
        f = flows(before, after)
        moving = {pair: v for pair, v in f.items() if pair[0] != pair[1]}
        assert {b for _, b in moving} == {f"shard-{n}"}
        assert moved_fraction(before, after) == pytest.approx(after.share()[f"shard-{n}"], abs=1e-12)
        assert moved_fraction(after, before) == pytest.approx(moved_fraction(before, after), abs=1e-12)


def test_flow_marginals_are_the_two_rings_shares() -> None:
    before, after = ring(4, w1=3), ring(5, w4=2)
    f = flows(before, after)
    src: dict[str, float] = {}
    dst: dict[str, float] = {}
    for (a, b), v in f.items():
        src[a] = src.get(a, 0) + v
        dst[b] = dst.get(b, 0) + v
    assert src == pytest.approx(before.share()) and dst == pytest.approx(after.share())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=6), st.lists(st.integers(1, 5), min_size=1, max_size=6),
       st.lists(st.binary(max_size=24), min_size=1, max_size=200))
def test_every_key_moves_along_a_flow_that_exists(w1: list[int], w2: list[int], sample: list[bytes]) -> None:
    a = Ring(ShardSpec(f"s{i}", w) for i, w in enumerate(w1))
    b = Ring(ShardSpec(f"s{i}", w) for i, w in enumerate(w2))
    f = flows(a, b)
    for key in sample:
        assert f.get((a.node_for(key), b.node_for(key)), 0) > 0


def test_moved_fraction_matches_counted_keys() -> None:
    before, after = ring(4), ring(3)
    ks = keys(40_000)
    counted = sum(before.node_for(k) != after.node_for(k) for k in ks) / len(ks)
    assert counted == pytest.approx(moved_fraction(before, after), abs=0.01)


# -- plans from samples --------------------------------------------------------------------------------


def shard_contents(r: Ring, ks: list[str], size: int = 100) -> dict[str, list[tuple[str | bytes, int]]]:
    out: dict[str, list[tuple[str | bytes, int]]] = {s.name: [] for s in r.shards}
    for k in ks:
        out[r.node_for(k)].append((k, size))
    return out


def test_exact_plan_counts_every_moving_key_and_byte() -> None:
    before, after = ring(3), ring(4)
    ks = keys(3_000)
    held = shard_contents(before, ks, size=120)
    plan = plan_moves(before, after, [ShardSample(n, len(v), v) for n, v in held.items()])
    moving = [k for k in ks if before.node_for(k) != after.node_for(k)]
    assert plan.exact and plan.keys_total == 3_000 and plan.keys_moving == len(moving)
    assert plan.bytes_moving == 120 * len(moving) and plan.bytes_total == 120 * 3_000
    new = plan.shards["shard-3"]
    assert new.keys_before == 0 and new.keys_in == len(moving) and new.keys_after == len(moving)
    assert sum(m.keys_after for m in plan.shards.values()) == 3_000
    assert set(plan.pairs) == {(f"shard-{i}", "shard-3") for i in range(3)}
    assert plan.key_fraction == pytest.approx(plan.hash_fraction, abs=0.03)
    assert new.share_before == 0 and new.share_after == after.share()["shard-3"]


def test_sampled_plan_extrapolates_to_the_key_count() -> None:
    before, after = ring(4), ring(3)
    ks = keys(20_000)
    held = shard_contents(before, ks)
    samples = [ShardSample(n, len(v), v[: len(v) // 10]) for n, v in held.items()]
    plan = plan_moves(before, after, samples)
    truth = sum(before.node_for(k) != after.node_for(k) for k in ks)
    assert not plan.exact and plan.keys_total == 20_000
    assert plan.keys_moving == pytest.approx(truth, rel=0.02)
    assert plan.shards["shard-3"].keys_after == pytest.approx(0, abs=1e-6)   # the removed shard ends empty


def test_empty_sample_falls_back_to_the_hash_space() -> None:
    before, after = ring(3), ring(4)
    plan = plan_moves(before, after, [ShardSample(f"shard-{i}", 1000) for i in range(3)])
    assert not plan.exact
    assert plan.keys_moving == pytest.approx(3000 * moved_fraction(before, after), rel=0.2)
    empty = plan_moves(before, after, [ShardSample(f"shard-{i}", 0) for i in range(3)])
    assert empty.keys_moving == 0 and empty.key_fraction == empty.hash_fraction


def test_a_key_on_a_shard_that_does_not_own_it_counts_as_moving() -> None:
    r = ring(3)
    stray = next(k for k in keys(100) if r.node_for(k) != "shard-0")
    plan = plan_moves(r, r, [ShardSample("shard-0", 1, [(stray, 10)])])
    assert plan.keys_moving == 1 and plan.hash_fraction == 0


# -- pacing --------------------------------------------------------------------------------------------------


def test_pacer_holds_the_rate_and_allows_a_burst() -> None:
    pacer = Pacer(1000, burst=100, now=0.0)
    assert pacer.delay(100, 0.0) == 0.0                  # the burst
    assert pacer.delay(500, 0.0) == pytest.approx(0.5)   # borrowed: wait half a second
    assert pacer.delay(100, 0.5) == pytest.approx(0.1)
    now, waited, done = 1.0, 0.0, 0
    for _ in range(100):                                  # steady state: 1000 units per second
        d = pacer.delay(50, now)
        now += d
        waited += d
        done += 50
    assert done / waited == pytest.approx(1000, rel=0.05)
    with pytest.raises(ValueError, match="rate"):
        Pacer(0)
