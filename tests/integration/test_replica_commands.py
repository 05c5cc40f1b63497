"""`crs shards add-replica / remove-replica` on a live node: a copy added to a published topology is
flushed and then filled by traffic (it receives every fill), is listed by `crs shards status`, and
leaves again without any key moving (placement is by shard name). A resharding move of shards with
replicas copies to, and cleans, every copy."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment, NodeProcess
from server import rpc
from server.proto import crs_pb2 as pb
from server.settings import settings_to_env
from tests.integration.support import (
    TableLocked,
    card_key,
    clients_of,
    crs_command,
    metric,
    own_env,
    redis_servers,
    sql,
    until,
)

NODE_SETTINGS = dict(near_cache_size=0, topology_poll_interval=0.2, topology_lease=2.0)


@pytest.fixture(scope="module")
def env() -> Iterator[DevEnvironment]:
    e = own_env(shards=2, customers=40)
    e.start()
    yield e
    e.stop()


def _crs(env: DevEnvironment, *args: str) -> subprocess.CompletedProcess[str]:
    """`crs shards ARGS` with an SRE's credentials."""
    return crs_command(env, "shards", *args, overrides={"CRS_PG_DSN": env.operator_dsn}, timeout=60)


def _card_on(env: DevEnvironment, node: NodeProcess, shard: str) -> tuple[int, str]:
    """A demo card whose cache key lives on `shard` (by the ring), and that key."""
    from shard_router import Ring, ShardSpec

    ring = Ring([ShardSpec(name, 1) for name in sorted(env.shard_urls())])
    for i in range(80):
        key = card_key(env.settings(), demo_pan(i))
        if ring.node_for(key) == shard:
            return i, key
    raise AssertionError(f"no demo card on {shard}")


def test_plan_json_is_json_even_with_nothing_to_plan(env: DevEnvironment) -> None:
    """`crs shards plan --json` promises one JSON object: a script asking how much a change moves got
    a sentence of text (and a json.loads traceback) whenever nothing was staged."""
    r = _crs(env, "plan", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["keys_moving"] == 0 and plan["hash_fraction"] == 0 and plan["pairs"] == [], plan
    assert plan["staged"] is False and plan["version"] == 0, plan


def test_add_and_remove_a_replica_live(env: DevEnvironment, tmp_path: Path) -> None:
    node = env.start_node(workers=1, **NODE_SETTINGS)
    with redis_servers(tmp_path, ["extra-copy"]) as (extra,), node.channel() as channel:
        lookup = rpc.stub(channel, "LookupService")
        copy = redis.Redis.from_url(extra.url)
        copy.set("stale:left-behind", "x")            # whatever a new copy holds is never served
        r = _crs(env, "add-replica", "shard-0", extra.url)
        assert r.returncode == 0, r.stderr
        assert "no key moves" in r.stdout and "holds 1 key(s)" in r.stdout
        assert "flushed the new copy (1 key(s) were on it)" in r.stdout, r.stdout
        history = _crs(env, "history").stdout
        assert "add-replica shard-0: write-only" in history, "two versions: written first, read after"
        i, key = _card_on(env, node, "shard-0")
        deadline = time.monotonic() + 15
        while copy.exists("stale:left-behind") or not copy.exists(key):
            assert time.monotonic() < deadline, "the node never flushed and filled the new copy"
            lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5)
            time.sleep(0.2)
        status = json.loads(_crs(env, "status", "--json").stdout)
        shard0 = next(s for s in status["shards"] if s["name"] == "shard-0")
        assert [c["copy"] for c in shard0["replicas"]] == ["replica-1"] and shard0["replicas"][0]["reachable"]
        again = _crs(env, "add-replica", "shard-0", extra.url, "--no-check")
        assert again.returncode == 2 and "already a replica" in again.stderr
        r = _crs(env, "remove-replica", "shard-0", extra.url)
        assert r.returncode == 0, r.stderr
        status = json.loads(_crs(env, "status", "--json").stdout)
        assert next(s for s in status["shards"] if s["name"] == "shard-0")["replicas"] == []
        assert _crs(env, "remove-replica", "shard-0", extra.url).returncode == 2
        # Lookups went on throughout, answered by the primary.
        assert lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5).card.last4 == demo_pan(i)[-4:]
    node.stop()
    env.nodes.remove(node)


def test_a_move_copies_to_and_cleans_every_copy(env: DevEnvironment, tmp_path: Path) -> None:
    """Both shards get a replica; removing shard-1 copies its keys to *both* copies of shard-0 (so the
    replica does not send them to PostgreSQL) and deletes them from *both* copies of shard-1."""
    node = env.start_node(workers=1, **NODE_SETTINGS)
    cards = range(60)
    with redis_servers(tmp_path, ["copy-0", "copy-1"]) as (copy0, copy1), node.channel() as channel:
        lookup = rpc.stub(channel, "LookupService")
        for name, server in (("shard-0", copy0), ("shard-1", copy1)):
            assert _crs(env, "add-replica", name, server.url).returncode == 0
        keys = {i: card_key(env.settings(), demo_pan(i)) for i in cards}
        replicas = {"shard-0": redis.Redis.from_url(copy0.url), "shard-1": redis.Redis.from_url(copy1.url)}
        from shard_router import Ring, ShardSpec

        ring = Ring([ShardSpec(name, 1) for name in sorted(env.shard_urls())])
        on_1 = [i for i in cards if ring.node_for(keys[i]) == "shard-1"]
        deadline = time.monotonic() + 20
        # The new copies are flushed, then refill from their siblings as reads reach them (round robin).
        while sum(replicas["shard-1"].exists(keys[i]) for i in on_1) < len(on_1) // 2:
            assert time.monotonic() < deadline, "shard-1's replica never refilled"
            for i in cards:
                lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5)
            time.sleep(0.3)
        assert _crs(env, "remove", "shard-1").returncode == 0
        r = _crs(env, "apply")
        assert r.returncode == 0, r.stderr
        primary0, primary1 = (redis.Redis.from_url(env.shard_urls()[n]) for n in ("shard-0", "shard-1"))
        moved = [i for i in on_1 if primary0.exists(keys[i])]
        assert len(moved) >= 0.9 * len(on_1), "the move copied shard-1's keys to shard-0"
        assert all(replicas["shard-0"].exists(keys[i]) for i in moved), "...and to shard-0's replica"
        assert not any(c.exists(keys[i]) for c in (primary1, replicas["shard-1"]) for i in on_1), \
            "the cleanup deleted them from every copy of shard-1"
        # Leave no copy behind whose server stops with this block (the next tests' topology).
        assert _crs(env, "remove-replica", "shard-0", copy0.url).returncode == 0
    node.stop()
    env.nodes.remove(node)


def test_a_new_copy_is_read_only_once_every_node_deletes_on_it(env: DevEnvironment, tmp_path: Path) -> None:
    """docs/audit-2026-12-04.md, shards 7: published in one step, a node still on the old version
    changed a card and deleted its key on the primary alone, while a node on the new version read the
    new copy, which kept the old answer for its TTL. Now the copy is written but not read until every
    live node runs the version that writes it, then flushed, then read."""
    lease = {"topology_lease": 30.0}
    fast = env.start_node(workers=1, **NODE_SETTINGS | lease)
    slow = env.start_node(workers=1, **NODE_SETTINGS | lease | {"topology_poll_interval": 8.0})
    with redis_servers(tmp_path, ["late-copy"]) as (extra,):
        reader, writer = clients_of(fast), clients_of(slow)
        i, key = _card_on(env, fast, "shard-0")
        req = pb.ResolveCardRequest(pan=demo_pan(i))
        card = reader.lookup.ResolveCard(req, timeout=5).card
        before = metric(fast, "crs_topology_version")
        assert metric(slow, "crs_topology_version") == before
        # Start the command just after the slow node's check: its next is 8 s away, by when shard_topology
        # is locked (below) and the check waits until the test is done with the two versions side by side.
        checked = metric(slow, "crs_topology_confirmed_timestamp_seconds")
        until("a check of the slow node's",
              lambda: metric(slow, "crs_topology_confirmed_timestamp_seconds") != checked, 20)
        done: dict[str, subprocess.CompletedProcess[str]] = {}
        command = threading.Thread(target=lambda: done.update(r=crs_command(
            env, "shards", "add-replica", "shard-0", extra.url, timeout=90,
            overrides={"CRS_PG_DSN": env.operator_dsn, "CRS_TOPOLOGY_LEASE": "30"})))
        command.start()
        try:
            deadline = time.monotonic() + 10
            while metric(fast, "crs_topology_version") == before:
                assert time.monotonic() < deadline, "the fast node never ran the new version"
                time.sleep(0.05)
            # The fast node runs the new version (the copy listed), the slow one still the old one, and
            # keeps it while the table is locked: its checks wait (and the fast node's, and the command's).
            with TableLocked(env.operator_dsn, "shard_topology"):
                assert metric(slow, "crs_topology_version") == before, "timing: the slow node moved on too early"
                copy, primary = redis.Redis.from_url(extra.url), redis.Redis.from_url(env.shard_urls()["shard-0"])
                status = card.status
                for _ in range(6):   # each read after the write goes to one copy first (round robin): try several
                    fill_by = time.monotonic() + 10
                    while not copy.exists(key):   # a miss (the key expired): the fast node fills every copy it writes
                        assert time.monotonic() < fill_by, "the fast node never filled the new copy"
                        primary.delete(key)
                        reader.lookup.ResolveCard(req, timeout=5)
                        time.sleep(0.02)
                    status = pb.CARD_STATUS_BLOCKED if status != pb.CARD_STATUS_BLOCKED else pb.CARD_STATUS_ACTIVE
                    writer.admin.SetCardStatus(pb.SetCardStatusRequest(card_token=card.token, status=status), timeout=5)
                    assert reader.lookup.ResolveCard(req, timeout=5).card.status == status, "a stale copy answered"
                assert metric(slow, "crs_topology_version") == before
        finally:
            command.join(timeout=90)
        r = done["r"]
        assert r.returncode == 0, r.stderr
        assert "waiting for" in r.stdout and "all 2 live node(s) run version" in r.stdout, r.stdout
        # Two versions (write-only, then read), after the first one published if none was (run alone).
        assert metric(fast, "crs_topology_version") == metric(slow, "crs_topology_version") == (before or 1) + 2
        for _ in range(6):
            assert reader.lookup.ResolveCard(req, timeout=5).card.status == status
        assert copy.get(key) in (None, primary.get(key))
        slow.stop()                      # it leaves the node list: the clean-up waits for the fast one only
        env.nodes.remove(slow)
        r = _crs(env, "remove-replica", "shard-0", extra.url, "--wait-timeout", "60")
        assert r.returncode == 0, r.stderr
    fast.stop()
    env.nodes.remove(fast)


@contextlib.contextmanager
def _stuck_node(env: DevEnvironment) -> Iterator[NodeProcess]:
    """A running node and, beside it, a live node that never moves on (a long lease, its version left
    behind): a command that waits for every live node waits for it until its --wait-timeout."""
    node = env.start_node(workers=1, **NODE_SETTINGS)
    dsn = env.operator_dsn
    deadline = time.monotonic() + 10
    while not sql(dsn, "SELECT 1 FROM node_status WHERE node_id NOT LIKE 'test/%' AND seen_at > now() - interval '5s'"):
        assert time.monotonic() < deadline, "the node never reported"
        time.sleep(0.1)
    sql(dsn, "INSERT INTO node_status (node_id, address, topology_version, phase, ring, lease_s, seen_at,"
             " bootstrap_shards, reinvalidate_delay_s) SELECT 'test/stuck', 'test:1', topology_version, phase, ring,"
             " 600, clock_timestamp(), bootstrap_shards, reinvalidate_delay_s FROM node_status"
             " WHERE node_id NOT LIKE 'test/%' ORDER BY seen_at DESC LIMIT 1")
    try:
        yield node
    finally:
        sql(dsn, "DELETE FROM node_status WHERE node_id = 'test/stuck'")
        node.stop()
        env.nodes.remove(node)


def test_an_interrupted_add_replica_says_how_to_finish_or_undo(env: DevEnvironment, tmp_path: Path) -> None:
    """Ctrl-C while add-replica waits for the nodes leaves a published version with the copy
    write-only: half done. It ended exit 130 without a word (apply and abort say what to run next)."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | settings_to_env(env.settings())
    with _stuck_node(env), redis_servers(tmp_path, ["half-copy"]) as (extra,):
        command = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "shards", "add-replica", "shard-0", extra.url,
             "--wait-timeout", "60"], cwd=Path(__file__).resolve().parents[2], text=True,
            env=child | {"CRS_PG_DSN": env.operator_dsn}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert command.stdout is not None
        for line in command.stdout:
            if "waiting for" in line:
                break
        command.send_signal(signal.SIGINT)          # Ctrl-C
        _, err = command.communicate(timeout=30)
        assert command.returncode == 130, err
        assert "interrupted" in err and f"add-replica shard-0 {extra.url}" in err and "remove-replica" in err, err
        sql(env.operator_dsn, "DELETE FROM node_status WHERE node_id = 'test/stuck'")
        r = _crs(env, "remove-replica", "shard-0", extra.url)     # undo, as the message says
        assert r.returncode == 0, r.stderr


def test_a_replica_change_that_outwaits_a_node_names_itself_to_rerun(env: DevEnvironment, tmp_path: Path) -> None:
    """A node still on the old version after --wait-timeout: the message said "Rerun `crs shards
    apply` to go on, or `crs shards abort`", which answer "nothing to do" to a replica change."""
    with _stuck_node(env), redis_servers(tmp_path, ["slow-copy"]) as (extra,):
        r = _crs(env, "add-replica", "shard-0", extra.url, "--wait-timeout", "1")
        assert r.returncode == 1 and f"crs shards add-replica shard-0 {extra.url}" in r.stderr, r.stderr
        assert "crs shards apply" not in r.stderr and "abort" not in r.stderr, r.stderr
        sql(env.operator_dsn, "DELETE FROM node_status WHERE node_id = 'test/stuck'")
        assert _crs(env, "add-replica", "shard-0", extra.url).returncode == 0     # as the message says
        assert _crs(env, "remove-replica", "shard-0", extra.url).returncode == 0


def test_shards_flush_empties_every_copy(env: DevEnvironment, tmp_path: Path) -> None:
    """After a PostgreSQL restore the shards hold answers from the lost history: `crs shards flush --yes`
    empties every copy of every shard in the topology in force (a replica too), and lookups refill. A
    copy that does not answer is named, the others are still flushed, exit 3."""
    node = env.start_node(workers=1, **NODE_SETTINGS)
    shards = json.loads(_crs(env, "status", "--json").stdout)["shards"]   # earlier tests moved shards
    first = shards[0]["name"]
    with redis_servers(tmp_path, ["flush-copy"]) as (extra,), node.channel() as channel:
        lookup = rpc.stub(channel, "LookupService")
        r = _crs(env, "add-replica", first, extra.url)
        assert r.returncode == 0, r.stderr
        copies = {f"{s['name']} primary": s["address"] for s in shards}
        copies |= {f"{s['name']} {c['copy']}": c["address"] for s in shards for c in s["replicas"]}
        added = f"{first} replica-{len(shards[0]['replicas']) + 1}"     # copies are labelled in order
        copies[added] = extra.url
        for i in range(8):
            lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(i)), timeout=5)
        clients = {where: redis.Redis.from_url(url) for where, url in copies.items()}
        for c in clients.values():
            c.set("stale:lost-history", "x")
        r = _crs(env, "flush")
        assert r.returncode == 2 and "--yes" in r.stderr, r.stderr
        assert all(c.exists("stale:lost-history") for c in clients.values()), "flushed without --yes"
        r = _crs(env, "flush", "--yes")
        assert r.returncode == 0, r.stderr
        for where, c in clients.items():
            assert c.dbsize() == 0, where
            assert f"flushed {where} " in r.stdout, r.stdout
        assert f"every copy of its {len(shards)} shard(s) is empty" in r.stdout, r.stdout
        assert lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(3)), timeout=5).card.token
    # The new copy's server is gone now: it is named, and the rest is flushed all the same.
    clients[f"{first} primary"].set("stale:lost-history", "x")
    r = _crs(env, "flush", "--yes")
    assert r.returncode == 3, r.stderr
    assert f"cannot flush {added}" in r.stderr and f"1 of {len(copies)} copies" in r.stderr, r.stderr
    assert clients[f"{first} primary"].dbsize() == 0
    r = _crs(env, "remove-replica", first, extra.url)
    assert r.returncode == 0, r.stderr
    node.stop()
