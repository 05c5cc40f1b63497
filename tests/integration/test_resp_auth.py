"""Shards that require a password (requirepass) or an ACL user, and error replies, on a real
redis-server: the lean client and the tier authenticate from the URL, a refused AUTH is a clear error
without the password, and an error reply fails one command without dropping the connection, marking
the shard down or flushing it."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import uvloop

from devstack import RedisServer
from server.cache.blocking import BlockingReader
from server.cache.breaker import BreakerPolicy
from server.cache.resp import PipelinedReader, RespAuthError, RespError, RespReplyError
from server.cache.shard import ShardUnavailable
from server.cache.thread_reads import L2, ThreadReads
from server.cache.tier import RedisTier
from shard_router.topology import Topology, TopologyShard

pytestmark = pytest.mark.integration

DEFAULT_PASSWORD = "s3cret-default"
ALICE_PASSWORD = "p@ss:w/rd%1"          # needs URL-encoding: the URL is decoded before AUTH
SENTINEL = "sentinel"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    base = Path(tempfile.mkdtemp(prefix="crs-resp-auth-"))
    srv = RedisServer(name="auth", data_dir=base / "redis", requirepass=DEFAULT_PASSWORD,
                      acl_users={"alice": ["on", f">{ALICE_PASSWORD}", "~*", "+@all"]})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def admin(server: RedisServer) -> redis.Redis:
    """redis-py on the same URL: it authenticates from the URL too."""
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.mset({f"k{i}": f"v{i}".encode() for i in range(10)})
    client.set(SENTINEL, b"still here")
    client.rpush("a-list", b"x")
    client.select(2)
    client.set("in-db-2", b"two")
    client.select(0)
    return client


def test_url_credentials(server: RedisServer) -> None:
    assert server.url == f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{server.port}/0"
    assert "%40" in server.url_as("alice", ALICE_PASSWORD)
    with pytest.raises(ValueError, match="requirepass"):
        RedisServer(name="x", data_dir=Path(tempfile.gettempdir()), requirepass="two words")
    with pytest.raises(ValueError, match="ACL rules"):
        RedisServer(name="x", data_dir=Path(tempfile.gettempdir()), acl_users={"bob": ["on", ">a b"]})


@pytest.mark.parametrize("who", ["default", "alice"])
def test_lean_client_authenticates_from_the_url(server: RedisServer, admin: redis.Redis, who: str) -> None:
    user = None if who == "default" else who
    password = DEFAULT_PASSWORD if user is None else ALICE_PASSWORD

    async def main() -> None:
        reader = PipelinedReader(server.url_as(user, password), timeout=1.0)
        assert password not in repr(reader)
        # Concurrent first commands all wait for AUTH: none may overtake it.
        got = await asyncio.gather(*(reader.get(f"k{i % 10}") for i in range(50)))
        assert got == [f"v{i % 10}".encode() for i in range(50)]
        assert await reader.mget(["k1", "nope"]) == [b"v1", None]
        await reader.set_px([("filled", b"f", 60_000)])
        reader.close()
        in_db_2 = PipelinedReader(server.url_as(user, password, db=2), timeout=1.0)   # AUTH, then SELECT
        assert await in_db_2.get("in-db-2") == b"two"
        in_db_2.close()

    uvloop.run(main())
    assert admin.get("filled") == b"f"


def test_refused_auth_is_a_clear_error_without_the_password(server: RedisServer, admin: redis.Redis) -> None:
    wrong = "not-the-Password-42"

    async def main() -> None:
        for url in (server.url_as(None, wrong), server.url_as("alice", wrong), server.url_as("mallory", wrong)):
            reader = PipelinedReader(url, timeout=1.0)
            with pytest.raises(RespAuthError, match="refused AUTH") as info:
                await reader.get("k1")
            assert wrong not in str(info.value) and wrong not in repr(info.value)
            assert isinstance(info.value, ConnectionError)     # the shard is unusable: a shard error
        with pytest.raises(RespAuthError, match="without a password"):
            await PipelinedReader(f"redis://alice@127.0.0.1:{server.port}/0", timeout=1.0).get("k1")
        anonymous = PipelinedReader(f"redis://127.0.0.1:{server.port}/0", timeout=1.0)
        with pytest.raises(RespAuthError, match="NOAUTH"):       # no credentials at all
            await anonymous.get("k1")
        anonymous.close()

    uvloop.run(main())


def test_a_hung_server_fails_the_handshake_in_time_as_a_connection_error(server: RedisServer,
                                                                          admin: redis.Redis) -> None:
    async def main() -> None:
        reader = PipelinedReader(server.url, timeout=0.3)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)      # accepts (the kernel does), never answers AUTH
        try:
            started = time.monotonic()
            with pytest.raises(RespError, match="no reply to AUTH") as info:
                await reader.get("k1")
            assert not isinstance(info.value, RespAuthError) and time.monotonic() - started < 1.5
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert await reader.get("k1") == b"v1"     # the next command connects again
        reader.close()

    uvloop.run(main())


def test_an_error_reply_fails_one_command_and_keeps_the_connection(server: RedisServer,
                                                                   admin: redis.Redis) -> None:
    async def main() -> None:
        reader = PipelinedReader(server.url, timeout=1.0)
        assert await reader.get("k1") == b"v1"
        connection = reader._protocol
        # Pipelined around the failing command: the others get their own replies.
        got = await asyncio.gather(reader.get("k2"), reader.get("a-list"), reader.get("k3"), return_exceptions=True)
        assert got[0] == b"v2" and got[2] == b"v3"
        assert isinstance(got[1], RespReplyError) and got[1].code == "WRONGTYPE"
        assert not isinstance(got[1], ConnectionError)
        # A fill batch with one bad SET (PX 0 is an error): the rest are written, the error is raised.
        with pytest.raises(RespReplyError, match="expire"):
            await reader.set_px([("good-1", b"1", 60_000), ("bad", b"x", 0), ("good-2", b"2", 60_000)])
        assert await reader.mget(["good-1", "good-2"]) == [b"1", b"2"]
        assert reader._protocol is connection                    # never reconnected
        reader.close()

    uvloop.run(main())
    assert admin.get(SENTINEL) == b"still here"


def test_thread_reads_authenticate_and_keep_the_connection_on_an_error_reply(server: RedisServer,
                                                                             admin: redis.Redis) -> None:
    for user, password in ((None, DEFAULT_PASSWORD), ("alice", ALICE_PASSWORD)):
        blocking = BlockingReader(PipelinedReader(server.url_as(user, password), timeout=1.0), max_connections=2)
        assert blocking.get("k1") == b"v1" and blocking.get("nope") is None
        with pytest.raises(RespReplyError) as info:
            blocking.get("a-list")
        assert info.value.code == "WRONGTYPE" and not isinstance(info.value, ConnectionError)
        assert blocking.get("k2") == b"v2"
        assert blocking._open == 1                               # the same connection all along
        blocking.close()
    in_db_2 = BlockingReader(PipelinedReader(server.url_as("alice", ALICE_PASSWORD, db=2), timeout=1.0),
                             max_connections=1)
    assert in_db_2.get("in-db-2") == b"two"                      # AUTH, then SELECT
    in_db_2.close()
    wrong = "not-the-Password-42"
    for url in (server.url_as(None, wrong), server.url_as("alice", wrong)):
        refused = BlockingReader(PipelinedReader(url, timeout=1.0), max_connections=1)
        with pytest.raises(RespAuthError, match="refused AUTH") as auth:
            refused.get("k1")
        assert wrong not in str(auth.value) and refused._open == 0
    with pytest.raises(RespAuthError, match="NOAUTH"):
        BlockingReader(PipelinedReader(f"redis://127.0.0.1:{server.port}/0", timeout=1.0), max_connections=1).get("k1")


# -- the tier on a password-protected shard -------------------------------------------------------
def one_shard(url: str) -> Topology:
    return Topology(version=1, shards=(TopologyShard("shard-0", url),))


class Events:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.replies: list[str] = []
        self.states: list[tuple[str, bool]] = []


@pytest.fixture
async def tier_events(server: RedisServer) -> AsyncIterator[tuple[RedisTier, Events]]:
    events = Events()
    tier = RedisTier(topology=one_shard(server.url_as("alice", ALICE_PASSWORD)), pool_size=4, timeout=0.5,
                     policy=BreakerPolicy(failure_threshold=1, retry_interval=0.05),
                     on_error=events.errors.append, on_reply_error=events.replies.append,
                     on_state_change=lambda name, up: events.states.append((name, up)))
    yield tier, events
    await tier.close()


async def test_the_tier_serves_from_a_password_protected_shard(admin: redis.Redis,
                                                                tier_events: tuple[RedisTier, Events]) -> None:
    tier, events = tier_events
    assert await tier.get("k4") == b"v4"                             # lean client
    assert await tier.mget(["k5", "nope"]) == [b"v5", None]
    await tier.set_many([("crd:filled", b"value", 60_000)])
    assert admin.get("crd:filled") == b"value" and await tier.get("crd:filled") == b"value"
    assert await tier.ping_all() == {"shard-0": True}                # redis-py
    got: list[str] = []
    listener = asyncio.create_task(tier.listen_invalidations(lambda keys, _position: got.extend(keys),
                                                             lambda _shard, _copy: None, retry_interval=0.1))
    try:
        for _ in range(100):                                         # until subscribed
            assert await tier.invalidate(["crd:filled"])
            if "crd:filled" in got:
                break
            await asyncio.sleep(0.02)
        assert "crd:filled" in got and admin.get("crd:filled") is None
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    # Marked down and active again: the probe (PING + FLUSHDB over redis-py) authenticates too.
    # (What apply_topology does for a shard marked down, then active; one shard cannot be marked down.)
    shard = tier.shards["shard-0"]
    shard.take_out()
    shard.put_back()
    for _ in range(100):
        try:
            assert await tier.get("k4") is None                      # back, and flushed
            break
        except ShardUnavailable:
            await asyncio.sleep(0.02)
    else:
        pytest.fail("the shard never came back")
    assert admin.dbsize() == 0 and events.errors == []


async def test_an_error_reply_is_a_miss_not_a_shard_failure(admin: redis.Redis,
                                                            tier_events: tuple[RedisTier, Events]) -> None:
    tier, events = tier_events
    shard = tier.shards["shard-0"]
    for _ in range(3):                                               # threshold is 1: once would do
        assert await tier.get("a-list") is None                      # WRONGTYPE: a miss
    assert await tier.get("k1") == b"v1"
    assert shard.is_up and shard.primary.breaker.failures == 0
    assert events.replies == ["shard-0"] * 3 and events.errors == [] and events.states == []
    assert admin.get(SENTINEL) == b"still here"                      # not flushed
    # The miss is filled as usual: SET replaces the list with the value.
    await tier.set_many([("a-list", b"value", 60_000)])
    assert await tier.get("a-list") == b"value"


async def test_a_wrong_password_marks_the_shard_down_without_logging_it(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "wrong-Password-77"
    errors: list[str] = []
    tier = RedisTier(topology=one_shard(server.url_as("alice", wrong)), pool_size=2, timeout=0.5,
                     policy=BreakerPolicy(failure_threshold=1, retry_interval=0.05), on_error=errors.append)
    try:
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(ShardUnavailable) as info:
                await tier.get("k1")
            assert isinstance(info.value.__cause__, RespAuthError)
            assert not tier.shards["shard-0"].is_up and errors == ["shard-0"]
            await asyncio.sleep(0.1)
            with pytest.raises(ShardUnavailable):
                await tier.get("k1")                                 # the probe runs and fails: still down
            await asyncio.sleep(0.1)
        assert not tier.shards["shard-0"].is_up
        logged = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
        assert "marked down" in logged and wrong not in logged
        assert wrong not in repr(tier.shards["shard-0"])
    finally:
        await tier.close()


async def test_thread_reads_through_the_tier_record_outcomes_on_the_loop(server: RedisServer,
                                                                          admin: redis.Redis) -> None:
    """ThreadReads.get, from a thread as a gRPC thread calls it: values and misses as `get` gives
    them; an error reply is a miss counted as one; a hung shard is L2.DOWN once its GET times out (the
    lookup goes to PostgreSQL) and its failure reaches the breaker on the loop, after which reads are
    left to `get`; a read that finds the one thread connection busy is left to the loop and counted."""
    events = Events()
    # The read timeout: the hung GET below must still hold the one thread connection when the second read
    # comes (with 0.4 s, a stall of 0.5 s before it let the first time out and the second find it free).
    timeout = 2.0
    tier = RedisTier(topology=one_shard(server.url_as("alice", ALICE_PASSWORD)), pool_size=2, timeout=timeout,
                     policy=BreakerPolicy(failure_threshold=1, retry_interval=60.0), thread_connections=1,
                     on_error=events.errors.append, on_reply_error=events.replies.append,
                     on_state_change=lambda name, up: events.states.append((name, up)))
    shard = tier.shards["shard-0"].primary
    busy: list[str] = []
    reads = ThreadReads(tier, asyncio.get_running_loop(), on_busy=busy.append)
    try:
        assert await asyncio.to_thread(reads.get, "k3") == b"v3"
        assert await asyncio.to_thread(reads.get, "nope") is L2.MISS
        assert await asyncio.to_thread(reads.get, "a-list") is L2.MISS     # WRONGTYPE
        await asyncio.sleep(0.01)                                    # the loop runs what the thread recorded
        assert events.replies == ["shard-0"] and events.errors == [] and shard.breaker.serving
        shard.warm_until = time.monotonic() + 60                     # warming: `get` asks a sibling first
        assert await asyncio.to_thread(reads.get, "k3") is L2.ASK
        shard.warm_until = 0.0
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            waiting = asyncio.ensure_future(asyncio.to_thread(reads.get, "k3"))
            assert shard.blocking is not None
            for _ in range(2000):                                    # until it holds the one connection
                if not shard.blocking._idle or waiting.done():
                    break
                await asyncio.sleep(0.005)
            assert await asyncio.to_thread(reads.get, "k4") is L2.ASK and busy == ["shard-0"]
            assert await waiting is L2.DOWN
            assert time.monotonic() - started < timeout + 1.5
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await asyncio.sleep(0.01)
        assert events.errors == ["shard-0"] and events.states == [("shard-0", False)] and not shard.breaker.serving
        assert await asyncio.to_thread(reads.get, "k3") is L2.ASK          # down: `get` probes it
    finally:
        await tier.close()
    assert shard.blocking is not None and shard.blocking._open == 0


@pytest.mark.parametrize("spelling", ["?db=2", "/0?db=2", "/2/"])
async def test_every_client_of_a_shard_uses_the_database_its_url_names(server: RedisServer, admin: redis.Redis,
                                                                       spelling: str) -> None:
    """The lean client (lookups' GETs and fills, the threads' GETs) read the database from the URL's
    path only; redis-py (deletes, the recovery probe's FLUSHDB) takes `?db=N` first, and a path like
    `/2/`. With such a URL, fills went to database 0 and every write's delete to database 2: each change
    stayed cached (a card set LOST answering ACTIVE) for the TTL, and a flush never emptied what was read."""
    url = server.url_as("alice", ALICE_PASSWORD).rsplit("/", 1)[0] + spelling
    tier = RedisTier(topology=one_shard(url), pool_size=2, timeout=0.5, thread_connections=1,
                     policy=BreakerPolicy(failure_threshold=1, retry_interval=0.05))
    try:
        await tier.set_many([("crd:split", b"old answer", 60_000)])       # a fill
        assert await tier.get("crd:split") == b"old answer"
        admin.select(2)
        try:
            assert admin.get("crd:split") == b"old answer", "the fill went to another database than the URL's"
        finally:
            admin.select(0)
        assert await tier.invalidate(["crd:split"])                        # a write's delete
        assert await tier.get("crd:split") is None, "the delete went to another database than the fill"
        reads = ThreadReads(tier, asyncio.get_running_loop())
        assert await asyncio.to_thread(reads.get, "crd:split") is L2.MISS
    finally:
        await tier.close()
