"""The pipelined Redis reader on a real redis-server, under uvloop as the nodes run it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import uvloop

from devstack import RedisServer
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
