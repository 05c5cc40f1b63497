"""The pipelined Redis reader on a real redis-server, under uvloop as the nodes run it, and the blocking
reader the hybrid serving model's gRPC threads read with."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import uvloop

from devstack import RedisServer
from server.cache.blocking import BUSY, BlockingReader
from server.cache.resp import PipelinedReader, RespError


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    base = Path(tempfile.mkdtemp(prefix="crs-resp-"))
    srv = RedisServer(name="resp", data_dir=base / "redis")
    srv.start()
    client = redis.Redis.from_url(srv.url)
    client.mset({f"k{i}": f"v{i}".encode() for i in range(100)})
    client.set("bin", bytes(range(256)))
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_get_mget_and_pipelining(server: RedisServer) -> None:
    async def main() -> None:
        reader = PipelinedReader(server.url, timeout=1.0)
        assert await reader.get("k1") == b"v1"
        assert await reader.get("missing") is None
        assert await reader.get("bin") == bytes(range(256))
        assert await reader.mget(["k2", "missing", "k3"]) == [b"v2", None, b"v3"]
        # 500 concurrent reads share one connection and come back matched to their keys.
        got = await asyncio.gather(*(reader.get(f"k{i % 100}") for i in range(500)))
        assert got == [f"v{i % 100}".encode() for i in range(500)]
        reader.close()

    uvloop.run(main())


def test_dead_and_hung_servers_fail_fast_and_recover(server: RedisServer) -> None:
    async def main() -> None:
        reader = PipelinedReader(server.url, timeout=0.3)
        assert await reader.get("k5") == b"v5"
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)       # hung: replies never come
        try:
            started = time.monotonic()
            with pytest.raises(RespError, match="no reply"):
                await asyncio.gather(*(reader.get("k6") for _ in range(10)))
            assert time.monotonic() - started < 1.5
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert await reader.get("k6") == b"v6"      # reconnects on next use
        reader.close()
        dead = PipelinedReader("redis://127.0.0.1:1/0", timeout=0.3)
        with pytest.raises(RespError, match="cannot connect"):
            await dead.get("k1")

    uvloop.run(main())


def test_fills_pipeline_on_the_same_connection(server: RedisServer) -> None:
    async def main() -> None:
        reader = PipelinedReader(server.url, timeout=1.0)
        await asyncio.gather(*(reader.set_px([(f"fill{i}", b"x" * i, 60_000)]) for i in range(200)))
        await reader.set_px([(f"many{i}", b"y", 60_000) for i in range(500)])
        assert await reader.mget(["fill3", "many499", "nope"]) == [b"xxx", b"y", None]
        reader.close()

    uvloop.run(main())
    ttl = redis.Redis.from_url(server.url).pttl("fill7")
    assert 0 < ttl <= 60_000


def test_shard_stats_over_the_lean_connection_match_redis_pys(server: RedisServer) -> None:
    """The node's periodic DBSIZE + INFO (read_stats_lean) reads what `crs shards status` reads with
    redis-py, and `call` keeps replies in order, failing only on an error reply."""
    import redis.asyncio

    from server.cache.resp import RespReplyError, command
    from server.topology.shard_stats import read_stats, read_stats_lean

    plain = redis.Redis.from_url(server.url)
    plain.set("stats-hit", b"1")
    plain.get("stats-hit")
    plain.get("stats-miss")

    async def main() -> None:
        reader = PipelinedReader(server.url, timeout=1.0)
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            full = await read_stats(client, timeout=1.0)   # first: redis-py's connect costs error replies
            lean = await read_stats_lean(reader)
            assert (lean.keys, lean.hits, lean.misses, lean.error_replies) == (
                full.keys, full.hits, full.misses, full.error_replies)
            assert lean.keys == plain.dbsize() and lean.hits >= 1 and lean.misses >= 1
            assert abs(lean.memory_bytes - full.memory_bytes) < full.memory_bytes * 0.2
            assert await reader.call([]) == []
            assert await reader.call([command(b"GET", b"k1"), command(b"DBSIZE")]) == [b"v1", plain.dbsize()]
            with pytest.raises(RespReplyError, match="WRONGTYPE"):
                await reader.call([command(b"GET", b"k1"), command(b"HGET", b"k1", b"f"), command(b"GET", b"k2")])
            assert await reader.get("k3") == b"v3"      # an error reply leaves the connection in use
        finally:
            reader.close()
            await client.aclose()

    uvloop.run(main())


# -- BlockingReader: GETs from threads ---------------------------------------------------------------
def test_thread_reads_answer_each_thread_its_own_key_over_bounded_connections(server: RedisServer) -> None:
    blocking = BlockingReader(PipelinedReader(server.url, timeout=1.0), max_connections=3)
    assert blocking.get("k1") == b"v1" and blocking.get("missing") is None
    assert blocking.get("bin") == bytes(range(256))
    big = bytes(range(256)) * 2048                         # 512 KiB: a reply in many reads
    redis.Redis.from_url(server.url).set("big", big)
    assert blocking.get("big") == big and blocking.get("k2") == b"v2"
    wrong: list[str] = []
    busy = [0]
    ours: set[int] = set()

    def reads(n: int) -> None:
        for i in range(300):
            key = f"k{(n * 7 + i) % 100}"
            got = blocking.get(key)
            if got is BUSY:
                busy[0] += 1
            elif got != f"v{key[1:]}".encode():
                wrong.append(f"{key}: {got!r}")
            if i == 150:   # mid-run: the connections the reader holds, seen from the server
                with blocking._lock:
                    ours.update(c.sock.getsockname()[1] for c in blocking._idle)

    threads = [threading.Thread(target=reads, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert wrong == []
    assert blocking._open <= 3 and len(ours) <= 3
    clients = redis.Redis.from_url(server.url).client_list()
    assert sum(1 for c in clients if int(c["addr"].rsplit(":", 1)[1]) in ours) == len(ours)
    blocking.close()
    assert blocking.get("k1") is BUSY and blocking._open == 0


def test_a_thread_read_is_refused_busy_and_a_silent_server_times_out() -> None:
    """One connection allowed: while a thread waits on a server that accepts and never answers, the next
    read is told BUSY at once; the waiting read fails after the timeout and its connection is closed."""
    with socket.create_server(("127.0.0.1", 0)) as silent:   # the kernel accepts; nothing ever answers
        port = silent.getsockname()[1]
        # The waiting read's timeout: the BUSY read below must come within it, even on a busy machine
        # (with 0.4 s, a stall that long before it let the waiting read time out and free its place).
        timeout = 2.0
        blocking = BlockingReader(PipelinedReader(f"redis://127.0.0.1:{port}/0", timeout=timeout), max_connections=1)
        outcome: list[BaseException | object] = []

        def waiting() -> None:
            try:
                outcome.append(blocking.get("k1"))
            except Exception as exc:
                outcome.append(exc)

        started = time.monotonic()
        t = threading.Thread(target=waiting)
        t.start()
        while blocking._open == 0 and time.monotonic() - started < 2:
            time.sleep(0.01)
        assert blocking.get("k2") is BUSY
        t.join(timeout + 3)
        assert isinstance(outcome[0], RespError) and "no reply" in str(outcome[0])
        assert timeout - 0.05 < time.monotonic() - started < timeout + 2.5
        assert blocking._open == 0 and blocking._idle == []      # closed, its place free again
    with pytest.raises(RespError, match="cannot connect"):
        BlockingReader(PipelinedReader("redis://127.0.0.1:1/0", timeout=0.3), max_connections=1).get("k1")


def test_a_thread_read_answered_a_byte_at_a_time_fails_within_its_timeout() -> None:
    """The timeout bounds the whole reply: a server that starts a reply and then sends one byte every
    0.1 s (each read on its own well within the timeout) fails the GET once the timeout has passed,
    and the next GET on a new connection gets its answer."""
    with socket.create_server(("127.0.0.1", 0)) as trickle:
        port = trickle.getsockname()[1]
        stop = threading.Event()

        def serve() -> None:
            first, _ = trickle.accept()
            with first:
                first.recv(100)
                first.sendall(b"$1000\r\n")
                for _ in range(30):   # 3 s at most: a reader that waits per read fails late, not never
                    if stop.wait(0.1):
                        break
                    with contextlib.suppress(OSError):
                        first.sendall(b"x")
            second, _ = trickle.accept()
            with second:
                second.recv(100)
                second.sendall(b"$2\r\nok\r\n")

        t = threading.Thread(target=serve)
        t.start()
        blocking = BlockingReader(PipelinedReader(f"redis://127.0.0.1:{port}/0", timeout=0.4), max_connections=1)
        started = time.monotonic()
        with pytest.raises(RespError, match=r"no reply .* within 0\.4s"):
            blocking.get("k1")
        took = time.monotonic() - started
        stop.set()
        assert 0.35 < took < 2.0, took      # a reader waiting per read takes the whole 3 s trickle
        assert blocking.get("k1") == b"ok"
        t.join(3)
