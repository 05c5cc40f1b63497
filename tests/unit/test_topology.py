"""The topology model, its stored form, the resharding state machine, routing per phase, and diff."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import shard_router
from shard_router import Ring, ShardSpec
from shard_router.addresses import redact_url
from shard_router.moves import abort, advance, begin, set_state, stage_add, stage_remove, stage_reweight
from shard_router.topology import (
    Change,
    Phase,
    ShardState,
    Topology,
    TopologyError,
    TopologyShard,
    diff,
    ring_text,
    routing_for,
)


def addr(i: int) -> str:
    return f"redis://10.0.0.{i}:6379/0"


def stable(n: int, version: int = 1, weights: dict[int, int] | None = None) -> Topology:
    weights = weights or {}
    return Topology(version=version, shards=tuple(TopologyShard(f"shard-{i}", addr(i), weights.get(i, 1))
                                                 for i in range(n)))


def grow(t: Topology) -> Topology:
    return begin(t, stage_add(t.shards, f"shard-{len(t.shards)}", addr(len(t.shards))))


# -- model and document ------------------------------------------------------------------------------


def test_document_round_trip_for_every_phase() -> None:
    t = stable(3)
    moving = grow(t)
    for topo in (t, moving, advance(moving), advance(advance(moving)), abort(advance(moving))):
        assert Topology.from_document(topo.to_document()) == topo


def test_bootstrap_is_version_0_and_stable() -> None:
    t = Topology.bootstrap([("shard-0", addr(0), 1), ("shard-1", addr(1), 2)])
    assert t.version == 0 and t.is_stable and ring_text(t.target_specs) == "shard-0:1,shard-1:2"
    assert t.source_ring is t.target_ring


@pytest.mark.parametrize(("doc", "message"), [
    ({"version": 1, "shards": []}, "at least one shard"),
    ({"version": -1, "shards": [{"name": "a", "address": addr(1)}]}, "version must be"),
    ({"version": "1", "shards": [{"name": "a", "address": addr(1)}]}, "version must be an integer"),
    ({"version": 1, "shards": [{"name": "a", "address": addr(1)}, {"name": "a", "address": addr(2)}]}, "unique"),
    ({"version": 1, "shards": [{"name": "a", "address": addr(1)}, {"name": "b", "address": addr(1)}]},
     "share an address"),
    ({"version": 1, "shards": [{"name": "a", "address": "http://x"}]}, "redis://"),
    ({"version": 1, "shards": [{"name": "a", "address": addr(1), "state": "gone"}]}, "state must be one of"),
    ({"version": 1, "shards": [{"name": "a", "address": addr(1), "state": "warming"}]}, "no warming"),
    ({"version": 1, "shards": [{"name": "a", "address": addr(1), "state": "down"}]}, "at least one shard must be"),
    ({"version": 1, "phase": "migrating", "shards": [{"name": "a", "address": addr(1)}]}, "needs its source"),
    ({"version": 1, "phase": "migrating", "source": [{"name": "a"}],
      "shards": [{"name": "a", "address": addr(1)}, {"name": "b", "address": addr(2)}]}, "must be warming"),
    ({"version": 1, "phase": "finishing", "source": [{"name": "z"}],
      "shards": [{"name": "a", "address": addr(1), "state": "warming"}]}, "missing from shards"),
    ({"version": 1, "phase": "bogus", "shards": [{"name": "a", "address": addr(1)}]}, "phase must be"),
    ({"version": 1, "shards": [{"name": "a", "address": addr(1)}], "extra": 1}, "unknown topology field"),
    ({"version": 1, "shards": [{"name": "A", "address": addr(1)}]}, "invalid shard name"),
    ({"shards": [{"name": "a", "address": addr(1)}]}, "lacks 'version'"),
])
def test_bad_documents_are_refused_with_a_reason(doc: dict[str, object], message: str) -> None:
    with pytest.raises((TopologyError, ValueError), match=message):
        Topology.from_document(doc)


# -- the state machine -------------------------------------------------------------------------------


def test_grow_goes_preparing_migrating_finishing_stable() -> None:
    t = stable(3, version=7)
    p = grow(t)
    assert (p.version, p.phase) == (8, Phase.PREPARING)
    assert p.shard("shard-3").state is ShardState.WARMING
    assert [s.name for s in p.source] == ["shard-0", "shard-1", "shard-2"]
    m = advance(p)
    f = advance(m)
    s = advance(f)
    assert [(x.version, x.phase) for x in (m, f, s)] == [
        (9, Phase.MIGRATING), (10, Phase.FINISHING), (11, Phase.STABLE)]
    assert s == stable(4, version=11)
    with pytest.raises(TopologyError, match="nothing to advance"):
        advance(s)


def test_shrink_drains_the_removed_shard_and_drops_it_at_the_end() -> None:
    t = stable(4)
    p = begin(t, stage_remove(t.shards, "shard-2"))
    assert p.shard("shard-2").state is ShardState.DRAINING
    assert [x.name for x in p.target_specs] == ["shard-0", "shard-1", "shard-3"]
    assert [x.name for x in p.source_specs] == ["shard-0", "shard-1", "shard-2", "shard-3"]
    end = advance(advance(advance(p)))
    assert end.names() == ["shard-0", "shard-1", "shard-3"] and end.is_stable


def test_reweight_keeps_states_and_moves_through_the_source_weights() -> None:
    t = stable(3)
    p = begin(t, stage_reweight(t.shards, "shard-1", 3))
    assert all(s.state is ShardState.ACTIVE for s in p.shards)
    assert ShardSpec("shard-1", 1) in p.source and ShardSpec("shard-1", 3) in p.target_specs
    assert advance(advance(advance(p))) == stable(3, version=5, weights={1: 3})


def test_abort_from_preparing_is_the_old_ring_at_once() -> None:
    t = stable(3, version=4)
    back = abort(grow(t))
    assert back.version == 6 and back.is_stable and back.shards == t.shards


@pytest.mark.parametrize("steps", [1, 2])   # from migrating, from finishing
def test_abort_later_is_a_finishing_move_back(steps: int) -> None:
    t = stable(3, weights={0: 2})
    moving = begin(t, stage_reweight(stage_add(t.shards, "shard-3", addr(3)), "shard-0", 1))
    for _ in range(steps):
        moving = advance(moving)
    back = abort(moving)
    assert back.phase is Phase.FINISHING and back.aborting
    assert back.shard("shard-3").state is ShardState.DRAINING
    assert back.target_specs == t.target_specs            # reads go to the old owners
    assert set(back.source) == set(moving.target_specs)     # the copies on the new owners get cleaned
    end = advance(back)
    assert end.is_stable and end.shards == t.shards and end.version == moving.version + 2


def test_abort_of_an_abort_goes_forward_again_and_stable_cannot_abort() -> None:
    t = stable(3)
    m = advance(grow(t))
    back = abort(m)
    forth = abort(back)
    assert forth.phase is Phase.FINISHING and not forth.aborting and forth.target_specs == m.target_specs
    with pytest.raises(TopologyError, match="nothing to abort"):
        abort(t)


def test_begin_refuses_no_change_a_move_in_progress_down_shards_and_address_changes() -> None:
    t = stable(3)
    with pytest.raises(TopologyError, match="nothing to apply"):
        begin(t, t.shards)
    with pytest.raises(TopologyError, match="finish it"):
        begin(grow(t), t.shards)
    down = set_state(t, "shard-1", ShardState.DOWN)
    with pytest.raises(TopologyError, match="marked down"):
        begin(down, stage_add(down.shards, "shard-3", addr(3)))
    moved = (TopologyShard("shard-0", addr(9)), *t.shards[1:], TopologyShard("shard-3", addr(3)))
    with pytest.raises(TopologyError, match="address cannot change"):
        begin(t, moved)


def test_staging_errors_name_the_problem() -> None:
    shards = stable(2).shards
    with pytest.raises(TopologyError, match="already in the topology"):
        stage_add(shards, "shard-0", addr(5))
    with pytest.raises(TopologyError, match="share an address"):
        stage_add(shards, "shard-5", addr(0))
    with pytest.raises(TopologyError, match="no shard named"):
        stage_remove(shards, "shard-9")
    with pytest.raises(TopologyError, match="last shard"):
        stage_remove(stage_remove(shards, "shard-0"), "shard-1")
    with pytest.raises(ValueError, match="invalid weight"):
        stage_reweight(shards, "shard-0", 0)


def test_mark_down_and_active_only_when_stable() -> None:
    t = stable(3)
    down = set_state(t, "shard-2", ShardState.DOWN)
    assert down.version == 2 and down.shard("shard-2").state is ShardState.DOWN
    assert down.target_ring.share() == t.target_ring.share()       # no key moves
    assert set_state(down, "shard-2", ShardState.ACTIVE).shards == t.shards
    with pytest.raises(TopologyError, match="already down"):
        set_state(down, "shard-2", ShardState.DOWN)
    with pytest.raises(TopologyError, match="active or down"):
        set_state(t, "shard-2", ShardState.WARMING)
    with pytest.raises(TopologyError, match="only in a stable"):
        set_state(grow(t), "shard-0", ShardState.DOWN)


# -- routing ---------------------------------------------------------------------------------------------


def test_routing_per_phase() -> None:
    t = stable(3)
    p = grow(t)
    m, f = advance(p), advance(advance(p))
    old, new = t.target_ring.share(), p.target_ring.share()
    r = routing_for(t)
    assert r.read.share() == old and r.fallback is None and r.also_invalidate is None
    r = routing_for(p)      # preparing: old owners serve, both get deletes
    assert r.read.share() == old and r.fallback is None and r.also_invalidate is not None
    assert r.also_invalidate.share() == new
    r = routing_for(m)      # migrating: new owner first, old owner second
    assert r.read.share() == new and r.fallback is not None and r.fallback.share() == old
    assert r.also_invalidate is not None and r.also_invalidate.share() == old
    r = routing_for(f)      # finishing: new owner only, deletes still on both
    assert r.read.share() == new and r.fallback is None
    assert r.also_invalidate is not None and r.also_invalidate.share() == old


# -- diff ------------------------------------------------------------------------------------------------


def test_diff_lists_every_kind_of_change() -> None:
    before = stable(3).shards
    after = (TopologyShard("shard-0", addr(0), 2), TopologyShard("shard-1", addr(7)),
             TopologyShard("shard-3", addr(3)))
    assert diff(before, after) == [
        Change("reweight", "shard-0", "1", "2"),
        Change("address", "shard-1", addr(1), addr(7)),
        Change("remove", "shard-2", before=f"{addr(2)} weight 1"),
        Change("add", "shard-3", after=f"{addr(3)} weight 1"),
    ]
    assert diff(before, before) == []
    assert str(Change("add", "x", after="y")) == "+ x (y)" and str(Change("remove", "x", before="y")) == "- x (y)"
    down = set_state(stable(3), "shard-1", ShardState.DOWN)
    assert [str(c) for c in diff(before, down.shards)] == ["~ shard-1 state active -> down"]


def test_addresses_in_changes_carry_no_password() -> None:
    assert redact_url("redis://alice:p%40ss@h:6379/0") == "redis://alice:***@h:6379/0"
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("unix:///run/redis.sock") == "unix:///run/redis.sock"
    before = (TopologyShard("shard-0", "redis://:old-pw@h:1/0"), TopologyShard("shard-1", addr(1)))
    after = (TopologyShard("shard-0", "redis://:new-pw@h:1/0"), TopologyShard("shard-2", "redis://u:pw2@h:2/0"))
    text = " ".join(str(c) for c in diff(before, after))
    assert "pw" not in text.replace(":***@", "") and "redis://:***@h:1/0" in text


def test_ring_text_is_canonical() -> None:
    assert ring_text([ShardSpec("b", 2), ShardSpec("a")]) == "a:1,b:2"
    assert Ring([ShardSpec("a")]).arcs()[-1] == (2**32 - 1, "a")


def test_shard_router_imports_no_io_module_at_all() -> None:
    """Every module of shard_router (ring, topology, planner, pacing...) stays pure."""
    names = [m.name for m in pkgutil.iter_modules(shard_router.__path__, "shard_router.")]
    assert {"shard_router.topology", "shard_router.planner", "shard_router.pacing"} <= set(names)
    for name in names:
        importlib.import_module(name)
    code = (
        f"import sys\nfor m in {names!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'redis', 'asyncio', 'socket', 'subprocess', 'selectors', 'ssl', 'grpc', 'asyncpg', 'server'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
