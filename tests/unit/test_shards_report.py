"""`crs shards status` drawn from a hand-made StatusReport: the text tables and the JSON form whose
keys scripts and tests/integration/test_resharding.py read; and the INFO field reader behind the nodes'
shard statistics. Pure: no PostgreSQL, no Redis."""

from __future__ import annotations

import datetime as dt
import io
import json
import textwrap

import pytest

from server.cli import shards_render
from server.topology.report import Publication, ShardRow, StagedChange, StatusReport
from server.topology.shard_stats import ShardStats, info_field
from server.topology.store import NodeReport, Progress
from shard_router.topology import Phase

PUBLISHED = Publication(dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC), "sre", "apply: staged change")
NODE = NodeReport("host-a/12", "host-a:50051", 7, "migrating", "shard-0:1,shard-1:1", ("shard-1",),
                  {"shard-1": 4}, 1.234)


def shard(name: str, *, share: float, source_share: float, stats: ShardStats | None = None,
          error: str | None = None, node_errors: int = 0, down_on: int = 0) -> ShardRow:
    return ShardRow(name=name, state="warming" if name == "shard-2" else "active",
                    address=f"redis://{name}:6379/0", weight=1, share=share, source_share=source_share,
                    stats=stats, error=error, node_errors=node_errors, down_on_nodes=down_on)


def moving_report() -> StatusReport:
    return StatusReport(
        version=7, phase=Phase.MIGRATING, aborting=False, stored_in="PostgreSQL table shard_topology",
        ring="shard-0:1,shard-1:1,shard-2:1", source_ring="shard-0:1,shard-1:1", publication=PUBLISHED,
        shards=(shard("shard-0", share=0.33, source_share=0.5, stats=ShardStats(1200, 3 * 1024 * 1024, 90, 10, 0)),
                shard("shard-1", share=0.34, source_share=0.5, error="unreachable (ConnectionError)",
                      node_errors=4, down_on=1),
                shard("shard-2", share=0.33, source_share=0.0, stats=ShardStats(0, 1024, 0, 0, 0))),
        lease=10.0, nodes=(NODE,),
        progress={"copy": {"shard-0": Progress("shard-0", 0, 1200, 400, 3, True, 2.5),
                           "shard-1": Progress("shard-1", 77, 300, 100, 0, False, 1.0)}},
        draft=None)


def test_status_text_of_a_move() -> None:
    out = io.StringIO()
    shards_render.status_text(moving_report(), out)
    head, _, rest = out.getvalue().partition("\n")
    assert head == ("Topology version 7 — migrating — PostgreSQL table shard_topology,"
                    " published 2024-05-01 12:00:00 UTC by sre (apply: staged change)")
    assert rest == textwrap.dedent("""\
          moving keys from shard-0:1,shard-1:1 to shard-0:1,shard-1:1,shard-2:1

        SHARD    STATE    ADDRESS                 WEIGHT  SHARE           KEYS                           MEMORY   HIT RATIO  ERRORS  DOWN ON
        shard-0  active   redis://shard-0:6379/0  1       50.0% -> 33.0%  1,200                          3.0 MiB  90.0%      0       -
        shard-1  active   redis://shard-1:6379/0  1       50.0% -> 34.0%  unreachable (ConnectionError)  -        -          4       1 node(s)
        shard-2  warming  redis://shard-2:6379/0  1       0.0% -> 33.0%   0                              1.0 KiB  -          0       -

        Nodes: 1 live (heartbeat within CRS_TOPOLOGY_LEASE = 10s)
        NODE       ADDRESS       VERSION  PHASE      SHARDS DOWN  SEEN
        host-a/12  host-a:50051  7        migrating  shard-1      1.2s ago
        All live nodes run version 7.

        copy step of version 7: 1,500 keys examined, 500 copied
        """)  # noqa: E501 (a table is as wide as it is)


def test_status_text_before_anything_is_published_with_a_staged_change() -> None:
    report = StatusReport(
        version=0, phase=Phase.STABLE, aborting=False, stored_in="PostgreSQL table shard_topology",
        ring="shard-0:1", source_ring="shard-0:1", publication=None,
        shards=(shard("shard-0", share=1.0, source_share=1.0, stats=ShardStats(5, 100, 0, 0, 0)),),
        lease=2.0, nodes=(), progress={},
        draft=StagedChange(0, ("+ shard-1 (redis://shard-1:6379/0 weight 1)",)))
    out = io.StringIO()
    shards_render.status_text(report, out)
    text = out.getvalue()
    assert text.startswith("Topology version 0 — stable — not published yet: nodes run CRS_REDIS_SHARDS;"
                           " PostgreSQL table shard_topology is empty\n\n")
    assert "shard-0  active  redis://shard-0:6379/0  1       100.0%  5     100 B   -" in text
    assert "Nodes: 0 live (heartbeat within CRS_TOPOLOGY_LEASE = 2s)\n" in text
    assert "NODE" not in text and "moving keys" not in text
    assert text.endswith("\nStaged change (against version 0), not applied:\n"
                         "  + shard-1 (redis://shard-1:6379/0 weight 1)\n"
                         "  next: crs shards plan, then crs shards apply (or crs shards abort to discard it)\n")


def test_status_json_keeps_its_keys_and_values() -> None:
    doc = json.loads(json.dumps(moving_report().as_dict(), default=str))
    assert list(doc) == ["version", "phase", "aborting", "stored_in", "published", "published_at", "published_by",
                         "reason", "shards", "nodes", "node_versions", "progress", "draft"]
    assert doc["version"] == 7 and doc["phase"] == "migrating" and doc["published"] is True
    assert doc["published_at"] == "2024-05-01T12:00:00+00:00" and doc["published_by"] == "sre"
    assert doc["shards"][0] == {
        "name": "shard-0", "state": "active", "address": "redis://shard-0:6379/0", "weight": 1, "share": 0.33,
        "source_share": 0.5, "keys": 1200, "memory_bytes": 3 * 1024 * 1024, "hit_ratio": 0.9, "hits": 90,
        "misses": 10, "reachable": True, "error": None, "node_errors": 0, "down_on_nodes": 0, "replicas": []}
    down = doc["shards"][1]
    assert not down["reachable"] and down["error"] == "unreachable (ConnectionError)"
    assert down["keys"] is None and down["hit_ratio"] is None and down["down_on_nodes"] == 1
    assert doc["nodes"] == [{"node_id": "host-a/12", "address": "host-a:50051", "topology_version": 7,
                             "phase": "migrating", "ring": "shard-0:1,shard-1:1", "shards_down": ["shard-1"],
                             "seen_s_ago": 1.23}]
    assert doc["node_versions"] == [7]
    assert doc["progress"] == {"copy": {
        "shard-0": {"shard": "shard-0", "scan_cursor": 0, "scanned": 1200, "moved": 400, "skipped": 3,
                    "done": True, "seconds": 2.5},
        "shard-1": {"shard": "shard-1", "scan_cursor": 77, "scanned": 300, "moved": 100, "skipped": 0,
                    "done": False, "seconds": 1.0}}}
    assert doc["draft"] is None


def test_status_json_of_a_staged_change_and_no_publication() -> None:
    report = StatusReport(
        version=0, phase=Phase.STABLE, aborting=False, stored_in="file /x.json", ring="", source_ring="",
        publication=None, shards=(), lease=10.0, nodes=(), progress={"cleanup": {}},
        draft=StagedChange(0, ("- shard-1",)))
    doc = report.as_dict()
    assert doc["published"] is False and doc["published_at"] is doc["published_by"] is doc["reason"] is None
    assert doc["progress"] == {} and doc["node_versions"] == []
    assert doc["draft"] == {"base_version": 0, "changes": ["- shard-1"]}


def test_replicas_are_listed_under_their_shard() -> None:
    from dataclasses import replace

    from server.topology.report import CopyRow

    with_replicas = replace(
        shard("shard-0", share=1.0, source_share=1.0, stats=ShardStats(10, 2048, 9, 1, 0)),
        replicas=(CopyRow("replica-1", "redis://shard-0-r1:6379/0", ShardStats(9, 1024, 0, 0, 0), None),
                  CopyRow("replica-2", "redis://shard-0-r2:6379/0", None, "unreachable (ConnectionError)")))
    report = replace(moving_report(), shards=(with_replicas,))
    out = io.StringIO()
    shards_render.status_text(report, out)
    lines = out.getvalue().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("shard-0"))
    assert lines[at + 1].split()[:3] == ["replica-1", "redis://shard-0-r1:6379/0", "9"]
    assert lines[at + 2].split()[:2] == ["replica-2", "redis://shard-0-r2:6379/0"]
    assert "unreachable (ConnectionError)" in lines[at + 2]
    replicas = with_replicas.as_dict()["replicas"]
    assert [(r["copy"], r["keys"], r["reachable"]) for r in replicas] == \
        [("replica-1", 9, True), ("replica-2", None, False)]


def test_info_fields_are_read_by_exact_name() -> None:
    text = (b"# Memory\r\nused_memory:1024\r\nused_memory_human:1.00K\r\nused_memory_rss:9000\r\n"
            b"maxmemory:0\r\n")
    assert info_field(text, b"used_memory") == 1024
    assert info_field(text, b"used_memory_rss") == 9000
    assert info_field(text, b"memory") == 0                    # a suffix of a name is not the name
    assert info_field(text, b"keyspace_hits") == 0             # absent: 0, as read_stats
    assert info_field(b"keyspace_hits:7", b"keyspace_hits") == 7   # first line, no line end
    assert info_field(b"a:1\r\nkeyspace_misses:42", b"keyspace_misses") == 42
    with pytest.raises(ValueError):
        info_field(b"used_memory:lots\r\n", b"used_memory")
