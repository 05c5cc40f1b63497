"""The file form of the topology (CRS_TOPOLOGY_FILE): compare-and-set publishing, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.topology.store import FileTopologyStore, TopologyConflict
from shard_router.moves import advance, begin, stage_add
from shard_router.topology import Topology, TopologyError, TopologyShard


def topo(version: int) -> Topology:
    return Topology(version=version, shards=(TopologyShard("shard-0", "redis://127.0.0.1:7000/0"),))


async def test_publish_is_compare_and_set(tmp_path: Path) -> None:
    store = FileTopologyStore(tmp_path / "topology.json")
    assert await store.current() is None and await store.current_version() == 0
    with pytest.raises(TopologyConflict, match="version 0 is in force"):
        await store.publish(topo(2), reason="skips a version")
    await store.publish(topo(1), reason="first")
    moving = begin(topo(1), stage_add(topo(1).shards, "shard-1", "redis://127.0.0.1:7001/0"))
    await store.publish(moving, reason="grow")
    assert await store.current() == moving and await store.current_version() == 2
    with pytest.raises(TopologyConflict):
        await store.publish(moving, reason="again")
    await store.publish(advance(moving), reason="next")
    doc = json.loads((tmp_path / "topology.json").read_text())
    assert doc["version"] == 3 and doc["phase"] == "migrating" and doc["note"] == "next"
    assert sorted(os.listdir(tmp_path)) == ["topology.json", "topology.json.lock"]   # no temporary file left


async def test_a_corrupt_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"version": 1, "shards": [{"name": "Bad Name", "address": "redis://x:1/0"}]}')
    with pytest.raises(TopologyError, match=r"t\.json"):
        await FileTopologyStore(path).current()
    path.write_text("{not json")
    with pytest.raises(TopologyError, match=r"t\.json"):
        await FileTopologyStore(path).current()


async def test_an_empty_file_is_nothing_published_yet(tmp_path: Path) -> None:
    """Created empty ahead of the first publish (nodes refuse a file that does not exist): version 0,
    the nodes' CRS_REDIS_SHARDS ring, and the first publish goes into it."""
    path = tmp_path / "topology.json"
    path.write_text("\n")
    store = FileTopologyStore(path)
    store.check(must_exist=True)
    assert await store.current() is None and await store.current_version() == 0
    await store.publish(topo(1), reason="first")
    assert await store.current() == topo(1)
    with pytest.raises(TopologyError, match="does not exist"):
        FileTopologyStore(tmp_path / "typo.json").check(must_exist=True)
    FileTopologyStore(tmp_path / "typo.json").check()        # `crs shards` publishes into a missing file
