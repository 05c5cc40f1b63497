"""A shard topology published by a newer release's `crs shards` while nodes of this release still serve
(a rolling upgrade, or a rollback): a document with a field this release does not know. Such a node
cannot apply it, and must not look gone while it keeps serving on the ring it runs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment
from devstack.processes import free_port
from server.proto import crs_pb2 as pb
from tests.integration.support import clients_of, metric, own_env, running, settled, sql, until

LEASE = 3.0     # a heartbeat every second
NODE_SETTINGS = dict(topology_poll_interval=0.2, topology_lease=LEASE)


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    yield from running(own_env(shards=1, customers=10))


def _heartbeat_age(env: DevEnvironment, node_id_like: str = "%") -> list[tuple[int, float]]:
    rows = sql(env.operator_dsn, "SELECT topology_version, extract(epoch FROM clock_timestamp() - seen_at) AS age"
                                 " FROM node_status WHERE node_id LIKE $1", node_id_like)
    return [(int(r["topology_version"]), float(r["age"])) for r in rows]


def _heartbeats(env: DevEnvironment) -> list[tuple[int, float]]:
    """(version, when) of each node's last heartbeat."""
    rows = sql(env.operator_dsn, "SELECT topology_version, extract(epoch FROM seen_at) AS at FROM node_status")
    return [(int(r["topology_version"]), float(r["at"])) for r in rows]


def test_a_node_that_cannot_read_the_topology_in_force_goes_on_reporting_its_own(env: DevEnvironment) -> None:
    """It stopped heartbeating (the check raised before the heartbeat), so after its lease `crs shards
    apply` presumed it gone and went on with the move, while it still served lookups, and deleted keys
    on a write, on the old ring. Now it reports the version it runs, which `apply` waits for, logs why
    once, and does not confirm the topology (CRSTopologyNodeBehind). A node of this release that starts
    then refuses (exit 2) saying the stored version is not one it can read."""
    node = env.start_node(workers=1, **NODE_SETTINGS)
    lookup = clients_of(node).lookup
    req = pb.ResolveCardRequest(pan=demo_pan(1))
    lookup.ResolveCard(req, timeout=5)
    until("the node's heartbeat", lambda: any(age < LEASE for _, age in _heartbeat_age(env)), 15)
    running_version = int(metric(node, "crs_topology_version"))
    published = running_version + 1
    doc = {"version": published, "phase": "stable",
           "shards": [{"name": "shard-0", "address": env.shard_urls()["shard-0"], "weight": 1, "state": "active"}],
           "placement": "a field of the next release"}
    sql(env.operator_dsn, "INSERT INTO shard_topology (version, document, reason) VALUES ($1, $2::jsonb, 'newer')",
        published, json.dumps(doc))
    try:
        # Until the node has looked at the new version (the old code logged a warning, then went quiet).
        said = ("not one this release can read", "topology check failed")
        until("the node's look at the new version", lambda: any(s in node.log_path.read_text() for s in said), 10)
        confirmed = settled(lambda: metric(node, "crs_topology_confirmed_timestamp_seconds"), "the confirmed time")
        # It goes on beating (the old code never beat again): counted, not timed, so a machine that
        # stalls the node for a second or two does not fail it.
        beats: set[tuple[int, float]] = set()
        end = time.monotonic() + 3 * LEASE
        while time.monotonic() < end:
            beats |= set(_heartbeats(env))
            time.sleep(0.2)
        assert {v for v, _ in beats} == {running_version}, beats
        assert len(beats) >= 3, f"the node stopped beating: it looks gone past its {LEASE:g} s lease ({beats})"
        assert lookup.ResolveCard(req, timeout=5).card.token
        assert metric(node, "crs_topology_version") == running_version
        assert metric(node, "crs_topology_confirmed_timestamp_seconds") == confirmed, "it confirmed what it cannot run"
        assert node.log_path.read_text().count('"msg":"the shard topology in force is not one') == 1, "logged once"
        port = free_port()
        with pytest.raises(RuntimeError, match="exited with code 2"):
            env.start_node(workers=1, port=port, **NODE_SETTINGS)
        log = (env.work_dir / "logs" / f"node-{port}.log").read_text()
        assert f"shard topology version {published} in PostgreSQL is not one this release can read" in log, log[-2000:]
    finally:
        sql(env.operator_dsn, "DELETE FROM shard_topology WHERE version = $1", published)
    until("the node confirming the topology again",
          lambda: metric(node, "crs_topology_confirmed_timestamp_seconds") > confirmed, 10)
