"""A node's metrics as Prometheus scrapes them from a `crs serve` with two workers (server/metrics.py,
server/serve.py): the supervisor's merged view of the workers' files.

- A worker that dies takes its gauges with it: its last state (the topology it ran, when it last
  checked it) no longer pins the node's (the outside check: `CRSTopologyNodeBehind` firing until the
  pod restarted). Its counters stay.
- A shard that does not answer at start is down from the first scrape, and the log says why.
- A shard removed from the topology, and a replica removed from a shard, leave the scrape.

These tests have their own stack: they change the shard topology. They run in this order (the third
publishes a topology; the second needs none published: its node runs CRS_REDIS_SHARDS).
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from devstack import free_port
from devstack.environment import DevEnvironment, NodeProcess
from devstack.processes import LogFile
from server import rpc
from server.proto import crs_pb2 as pb
from shard_router.addresses import ShardAddress
from tests.integration.support import (
    UsedSecrets,
    crs_command,
    fresh_pan,
    metric,
    metrics_dir,
    own_env,
    running,
    worker_pids,
)

NODE: dict[str, object] = dict(workers=2, topology_poll_interval=0.2, topology_lease=2.0, shard_stats_interval=0.2)
_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    yield from running(own_env(shards=3, replicas=1))


def scrape(node: NodeProcess) -> list[Sample]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.settings.metrics_port}/metrics", timeout=5).read().decode()
    found = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m is not None, line
            found.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return found


def gauges_of_shard(samples: list[Sample], shard: str) -> set[str]:
    """What the scrape shows about `shard` besides counters (which stay: they never go back)."""
    return {f"{name}{sorted(labels.items())}" for name, labels, _ in samples
            if labels.get("shard") == shard and not name.endswith(("_total", "_created"))}


def wait_for(what: str, check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def stop(env: DevEnvironment, node: NodeProcess) -> None:
    node.stop()
    env.nodes.remove(node)


def test_a_dead_workers_last_state_leaves_the_node_metrics(env: DevEnvironment, used_secrets: UsedSecrets) -> None:
    node = env.start_node(**NODE)
    try:
        wait_for("two workers", lambda: len(worker_pids(node)) == 2)
        pids = worker_pids(node)
        directory = metrics_dir(min(pids))
        for _ in range(6):   # a connection each: SO_REUSEPORT spreads them over the workers
            with node.channel() as channel:
                lookup = rpc.stub(channel, "LookupService")
                lookup.BatchResolve(pb.BatchResolveRequest(keys=[pb.LookupKey(pan=fresh_pan(used_secrets))]),
                                    timeout=5)
        wait_for("the calls counted", lambda: metric(node, "crs_rpc_latency_seconds_count") >= 6)
        counted = metric(node, "crs_rpc_latency_seconds_count")
        # A worker that answered some of them: its counts must stay in the node's.
        victim = min(pid for pid in pids if (directory / f"histogram_{pid}.db").exists())
        os.kill(victim, signal.SIGTERM)     # it drains and exits; the supervisor starts another
        wait_for("the worker gone", lambda: victim not in worker_pids(node))
        gone_at = time.time()
        wait_for("the worker replaced", lambda: len(worker_pids(node)) == 2)
        # The dead worker's last check (before gone_at) would be the node's minimum for ever.
        wait_for("the node's topology check is current",
                 lambda: metric(node, "crs_topology_confirmed_timestamp_seconds") > gone_at + 0.5)
        files = {p.name for p in directory.iterdir()}
        assert not [f for f in files if f.startswith("gauge_") and f.endswith(f"_{victim}.db")], files
        # Its counts went into the retired workers' files, its own files with it (they piled up, one set
        # per restart: server/metric_files.py); the node's totals are unchanged (below).
        assert f"counter_{victim}.db" not in files and f"histogram_{victim}.db" not in files, files
        assert {"counter_retired.db", "histogram_retired.db"} <= files, files
        assert metric(node, "crs_rpc_latency_seconds_count") >= counted, "counters never go back"
        assert metric(node, "crs_database_up") == 1
        assert metric(node, "crs_topology_version") == 0     # CRS_REDIS_SHARDS: nothing published
        assert "worker exited; restarting" in LogFile(node.log_path).text()
        names = {name for name, _, _ in scrape(node)}
        # Nothing to say, nothing said: no replica (CRS_PG_READ_DSN), no TLS in this stack.
        assert "crs_pg_replica_staleness_seconds" not in names
        assert "crs_tls_certificate_expiry_timestamp_seconds" not in names
    finally:
        stop(env, node)


def test_a_shard_that_does_not_answer_at_start_is_down_from_the_first_scrape(env: DevEnvironment) -> None:
    password = "metrics-test-pw-7f3a"
    dead = ShardAddress("shard-9", f"redis://:{password}@127.0.0.1:{free_port()}/0")
    node = env.start_node(redis_shards=(*env.shard_addresses(), dead), **NODE)
    try:
        # Both workers serving (start_node waits for one); no lookup has used shard-9.
        wait_for("two workers serving", lambda: LogFile(node.log_path).text().count('"node serving"') == 2)
        samples = scrape(node)
        up = {labels["shard"]: value for name, labels, value in samples if name == "crs_cache_shard_up"}
        assert up == {"shard-0": 1, "shard-1": 1, "shard-2": 1, "shard-9": 0}
        copies = {(labels["shard"], labels["copy"]): value for name, labels, value in samples
                  if name == "crs_cache_copy_up"}
        assert copies[("shard-9", "primary")] == 0 and copies[("shard-0", "replica-1")] == 1
        log = LogFile(node.log_path).text()
        down = [line for line in log.splitlines() if "cache shard copy marked down" in line and "shard-9" in line]
        assert len(down) == 2, log                      # once per worker
        assert all("ECONNREFUSED" in line and "ConnectionRefusedError" in line for line in down), down
        assert password not in log
    finally:
        stop(env, node)


def test_a_shard_removed_from_the_topology_leaves_the_node_metrics(env: DevEnvironment) -> None:
    node = env.start_node(**NODE)

    def crs_shards(*args: str) -> None:
        r = crs_command(env, "shards", *args, overrides={"CRS_PG_DSN": env.operator_dsn})   # an SRE's login
        assert r.returncode == 0, f"crs shards {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"

    try:
        wait_for("shard-2's stats", lambda: any(name == "crs_cache_shard_keys" and labels == {"shard": "shard-2"}
                                                for name, labels, _ in scrape(node)))
        before = gauges_of_shard(scrape(node), "shard-2")
        assert {"crs_cache_shard_up[('shard', 'shard-2')]",
                "crs_cache_shard_memory_bytes[('shard', 'shard-2')]"} <= before, before

        shard0 = next(a for a in env.shard_addresses() if a.name == "shard-0")
        crs_shards("remove-replica", "shard-0", shard0.replicas[0])

        def replica_gone() -> bool:
            copies = {labels["copy"] for name, labels, _ in scrape(node)
                      if name == "crs_cache_copy_up" and labels["shard"] == "shard-0"}
            return copies == {"primary"}

        wait_for("shard-0's replica left the scrape", replica_gone)

        crs_shards("remove", "shard-2")
        crs_shards("apply")
        wait_for("shard-2 left the scrape", lambda: gauges_of_shard(scrape(node), "shard-2") == set())
        time.sleep(1.0)   # a few more stats rounds and topology polls: nothing comes back
        samples = scrape(node)
        assert gauges_of_shard(samples, "shard-2") == set()
        for shard in ("shard-0", "shard-1"):
            assert {f"crs_cache_shard_up[('shard', '{shard}')]", f"crs_cache_shard_keys[('shard', '{shard}')]",
                    f"crs_cache_shard_state[('shard', '{shard}'), ('state', 'active')]"} <= gauges_of_shard(
                        samples, shard)
        assert not any(value in (float("inf"), float("-inf")) for _, _, value in samples)
    finally:
        stop(env, node)
