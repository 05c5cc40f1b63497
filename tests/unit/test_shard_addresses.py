"""Two spellings of one Redis server are one server (docs/audit-2026-12-04.md, shards 10): a shard
listed twice under two spellings would have its joining copy flushed while it serves. And the shard
list a node reports in its heartbeat names servers, never a password."""

from __future__ import annotations

import pytest

from server.cache.breaker import BreakerPolicy
from server.cache.shard import Shard
from server.topology.policy import MigrationPolicy
from shard_router.addresses import ShardListError, address_key, parse_shards, seed_text
from shard_router.topology import Topology, TopologyError, TopologyShard


@pytest.mark.parametrize(("one", "other"), [
    ("redis://127.0.0.1:6379", "redis://localhost:6379/0"),
    ("redis://LOCALHOST/0", "redis://user:secret@127.0.0.1:6379"),
    ("redis://cache-0.crs:6379/2", "rediss://cache-0.crs:6379?db=2"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock?db=0"),
])
def test_spellings_of_one_server_are_one(one: str, other: str) -> None:
    assert address_key(one) == address_key(other)
    with pytest.raises(TopologyError, match="share an address"):
        Topology(version=1, shards=(TopologyShard("shard-0", one), TopologyShard("shard-1", other)))
    with pytest.raises(TopologyError, match="listed twice"):
        TopologyShard("shard-0", one, replicas=(other,))
    with pytest.raises(ShardListError, match="cannot share a url"):
        parse_shards(f"shard-0={one},shard-1={other}")


@pytest.mark.parametrize(("one", "other"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6380/0"),
    ("redis://cache-0:6379/0", "redis://cache-1:6379/0"),
    ("redis://h:abc/0", "redis://h:xyz/0"),
    ("unix:///run/a.sock", "unix:///run/b.sock"),
])
def test_other_servers_or_databases_are_other(one: str, other: str) -> None:
    assert address_key(one) != address_key(other)


def test_the_reported_shard_list_names_servers_in_name_order_without_passwords() -> None:
    text = seed_text([("shard-1", 2, ["redis://u:hunter2@cache-1:6379/0"]),
                      ("shard-0", 1, ["redis://localhost/0", "redis://cache-9:6380/0"])])
    assert text == "shard-0=127.0.0.1:6379/0|cache-9:6380/0;1,shard-1=cache-1:6379/0;2"
    assert "hunter2" not in text


def test_the_copy_budget_fits_inside_every_node_reinvalidation_delay() -> None:
    policy = MigrationPolicy(copy_budget=0.25)
    assert policy.within_nodes([None, 2.0]).copy_budget == 0.25
    assert policy.within_nodes([0.5, 0.2, None]).copy_budget == pytest.approx(0.1)
    assert policy.within_nodes([]).copy_budget == 0.25


@pytest.mark.parametrize("address", ["redis://127.0.0.1:99999/0", "redis://127.0.0.1:port/0",
                                     "redis://127.0.0.1:0/0", "redis://127.0.0.1:6379?db=two"])
def test_an_address_the_nodes_clients_refuse_is_refused_when_read(address: str) -> None:
    """Such an address passed the topology's checks (and `crs shards`' probe: redis-py ignores a db it
    cannot read), and the node's own clients raised ValueError when it switched to the version: the
    topology task failed, the node stopped, and every restart failed again on the same version."""
    with pytest.raises(TopologyError, match=r"port|db"):
        TopologyShard("shard-0", address)
    with pytest.raises(ShardListError, match=r"port|db"):
        parse_shards(f"shard-0={address}")


@pytest.mark.parametrize(("address", "db"), [("redis://127.0.0.1:6379?db=2", 2), ("redis://127.0.0.1:6379/1?db=2", 2),
                                             ("redis://127.0.0.1:6379/2/", 2), ("redis://127.0.0.1:6379/x", 0)])
def test_every_client_reads_the_database_an_address_names_alike(address: str, db: int) -> None:
    """The lean client (lookups), redis-py (deletes, the recovery flush) and the address's identity
    name one database: a fill and the delete of its key must meet (tests/integration/test_resp_auth.py)."""
    shard = Shard("shard-0", address, pool_size=1, timeout=1.0, policy=BreakerPolicy())
    assert shard.reader is not None and shard.reader.db == db
    assert shard.client.connection_pool.connection_kwargs.get("db", 0) == db
    assert address_key(address) == f"127.0.0.1:6379/{db}"
