"""Replicated shards in the configuration and the topology: the syntax, its checks, the stored
document, that replicas never move a key (placement is by shard name and weight only), and which
copy a read tries first."""

from __future__ import annotations

import pytest

from server.cache.breaker import BreakerPolicy
from server.cache.replicas import ReplicatedShard
from server.cache.shard import Shard, copy_label
from server.settings import SettingsError, load_settings
from shard_router.addresses import ShardListError, format_shards, parse_shards
from shard_router.topology import Topology, TopologyError, TopologyShard, diff

A, B, C, D = (f"redis://127.0.0.1:{p}/0" for p in (6001, 6002, 6003, 6004))


def test_copies_are_separated_by_a_bar_and_the_old_syntax_still_parses() -> None:
    shards = parse_shards(f"shard-0={A}|{B};weight=2, shard-1={C}")
    assert [(s.name, s.url, s.replicas, s.weight) for s in shards] == [
        ("shard-0", A, (B,), 2), ("shard-1", C, (), 1)]
    assert shards[0].copies == (A, B)
    assert parse_shards(format_shards(shards)) == shards
    assert format_shards(shards) == f"shard-0={A}|{B};weight=2,shard-1={C}"


@pytest.mark.parametrize(("text", "message"), [
    (f"shard-0={A}|", "every url"),
    (f"shard-0={A}|http://x:1/0", "every url"),
    (f"shard-0={A}|{A}", "listed twice"),
    (f"shard-0={A}|{B},shard-1={B}", "cannot share a url"),
])
def test_bad_copies_are_refused_naming_the_shard(text: str, message: str) -> None:
    with pytest.raises(ShardListError, match=message):
        parse_shards(text)


def test_replicas_are_stored_only_when_present_and_round_trip() -> None:
    t = Topology.bootstrap([("shard-0", A, 1, (B,)), ("shard-1", C, 1)])
    doc = t.to_document()
    assert doc["shards"][0]["replicas"] == [B] and "replicas" not in doc["shards"][1]
    assert Topology.from_document(doc) == t
    assert t.shard("shard-0").copies == (A, B)


def test_replicas_never_change_placement() -> None:
    plain = Topology.bootstrap([("shard-0", A, 1), ("shard-1", C, 2)])
    replicated = Topology.bootstrap([("shard-0", A, 1, (B,)), ("shard-1", C, 2, (D,))])
    keys = [f"crd:{i}" for i in range(2000)]
    assert [plain.target_ring.node_for(k) for k in keys] == [replicated.target_ring.node_for(k) for k in keys]


def test_bad_replicas_in_a_topology_are_refused() -> None:
    with pytest.raises(TopologyError, match="share an address"):
        Topology(version=1, shards=(TopologyShard("shard-0", A, replicas=(B,)), TopologyShard("shard-1", B)))
    with pytest.raises(TopologyError, match="listed twice"):
        TopologyShard("shard-0", A, replicas=(A,))
    with pytest.raises(TopologyError, match="must start with"):
        TopologyShard("shard-0", A, replicas=("http://x/0",))
    with pytest.raises(TopologyError, match="replicas and write_only must be lists"):
        Topology.from_document({"version": 1, "shards": [{"name": "s", "address": A, "replicas": B}]})


def test_diff_names_a_replica_change() -> None:
    before = (TopologyShard("shard-0", A),)
    after = (TopologyShard("shard-0", A, replicas=(B,)),)
    assert [str(c) for c in diff(before, after)] == [f"~ shard-0 replicas none -> {B}"]


def test_a_replica_is_added_and_removed_through_a_write_only_version_without_moving_keys() -> None:
    from shard_router.moves import add_replica, begin, retire_replica, settle_replica

    t = Topology(version=3, shards=(TopologyShard("shard-0", A), TopologyShard("shard-1", B)))
    half = add_replica(t, "shard-0", C)
    assert half.version == 4 and half.shard("shard-0").replicas == (C,) and half.shard("shard-0").write_only == (C,)
    assert half.shard("shard-0").readable == (A,)
    assert Topology.from_document(half.to_document()) == half
    assert [str(c) for c in diff(t.shards, half.shards)] == [f"~ shard-0 replicas none -> {C} (write-only)"]
    with pytest.raises(TopologyError, match="write-only replica: finish"):
        begin(half, (TopologyShard("shard-0", A), TopologyShard("shard-1", B), TopologyShard("shard-2", D)))
    done = settle_replica(half, "shard-0", C, keep=True)
    assert done.version == 5 and done.shard("shard-0").write_only == () and done.shard("shard-0").readable == (A, C)
    assert "write_only" not in done.to_document()["shards"][0]
    with pytest.raises(TopologyError, match="already has the copy"):
        add_replica(done, "shard-0", C)
    with pytest.raises(TopologyError, match="not a write-only replica"):
        settle_replica(done, "shard-0", C, keep=False)
    leaving = retire_replica(done, "shard-0", C)
    assert leaving.shard("shard-0").readable == (A,) and leaving.shard("shard-0").replicas == (C,)
    with pytest.raises(TopologyError, match="already write-only"):
        retire_replica(leaving, "shard-0", C)
    gone = settle_replica(leaving, "shard-0", C, keep=False)
    assert gone.shard("shard-0").replicas == () and gone.version == 7
    with pytest.raises(TopologyError, match="not a replica"):
        retire_replica(gone, "shard-0", C)
    for each in (half, done, leaving, gone):   # placement is by name and weight: no key moves
        assert [s.spec for s in each.shards] == [s.spec for s in t.shards]
        assert each.target_ring.node_for("some-key") == t.target_ring.node_for("some-key")


@pytest.mark.parametrize(("write_only", "message"), [((A,), "some of its replicas"), ((C,), "some of its replicas"),
                                                     ((B, B), "each once")])
def test_only_replicas_can_be_write_only(write_only: tuple[str, ...], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        TopologyShard("shard-0", A, replicas=(B,), write_only=write_only)
    with pytest.raises(TopologyError, match="write_only must be lists"):
        Topology.from_document({"version": 1, "shards": [{"name": "s", "address": A, "replicas": [B],
                                                          "write_only": B}]})


def test_a_write_only_copy_is_written_but_never_read() -> None:
    group = ReplicatedShard("shard-0", _copies(3), write_only=("redis://127.0.0.1:10/0",))
    assert [c.copy for c in group.readers] == ["primary", "replica-2"]
    firsts = [group._order()[0].copy for _ in range(4)]
    assert firsts == ["primary", "replica-2"] * 2
    seen = []
    for _ in range(2):   # a read on a gRPC thread
        seen.append(group.first_copy().copy)
        group.took_first()
    assert seen == ["primary", "replica-2"]
    assert group.only is None and len(group.copies) == 3   # writes go to all three
    preferring = ReplicatedShard("shard-0", _copies(2), preferred="replica-1", write_only=("redis://127.0.0.1:10/0",))
    assert preferring.preferred is None and [c.copy for c in preferring._order()] == ["primary"]
    with pytest.raises(ValueError, match="primary cannot be write-only"):
        ReplicatedShard("shard-0", _copies(2), write_only=("redis://127.0.0.1:9/0",))


def _copies(n: int) -> list[Shard]:
    policy = BreakerPolicy(failure_threshold=1, retry_interval=60.0)
    return [Shard("shard-0", f"redis://127.0.0.1:{9 + i}/0", copy=copy_label(i), pool_size=1, timeout=0.1,
                  policy=policy) for i in range(n)]


def test_reads_spread_over_copies_without_a_preference() -> None:
    group = ReplicatedShard("shard-0", _copies(3))
    firsts = [group._order()[0].copy for _ in range(6)]
    assert firsts == ["primary", "replica-1", "replica-2"] * 2


def test_a_preferred_copy_is_read_first_and_the_others_stay_its_failover() -> None:
    group = ReplicatedShard("shard-0", _copies(3), preferred="replica-2")
    for _ in range(3):
        assert [c.copy for c in group._order()] == ["replica-2", "primary", "replica-1"]
    assert ReplicatedShard("shard-0", _copies(2), preferred="replica-2").preferred is None, \
        "a shard without that copy spreads its reads"


def test_the_preferred_copy_setting_is_checked() -> None:
    base = {"CRS_PG_DSN": "postgresql://x@127.0.0.1/x"}
    assert load_settings(base | {"CRS_CACHE_PREFERRED_COPY": "replica-1"}).cache_preferred_copy == "replica-1"
    with pytest.raises(SettingsError, match="CRS_CACHE_PREFERRED_COPY"):
        load_settings(base | {"CRS_CACHE_PREFERRED_COPY": "zone-a"})
