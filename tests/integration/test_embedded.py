"""The embedded-server launcher (devstack/) against real PostgreSQL and Redis binaries."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis

from devstack import (
    EmbeddedServerError,
    EmbeddedStack,
    PostgresServer,
    RedisServer,
    find_postgres_bindir,
    find_redis_server,
    free_port,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
REPO_ROOT = Path(__file__).resolve().parents[2]


def _pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (a reparented zombie is as good as gone)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _children(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children() if _pid_alive(child.pid)}
    except psutil.NoSuchProcess:
        return set()


def _wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = {pid for pid in pids if _pid_alive(pid)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = {pid for pid in alive if _pid_alive(pid)}
    return alive


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A fresh directory in /tmp that another user can traverse (as root, PostgreSQL runs as one).

    pytest's tmp_path sits under /tmp/pytest-of-root (mode 700), which PostgreSQL could not reach.
    """
    path = Path(tempfile.mkdtemp(prefix="crs-test-embedded-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("kind", ["system", "pgserver"])
async def test_postgres_start_query_kill_restart_stop(kind: str, base_dir: Path) -> None:
    try:
        find_postgres_bindir(kind)
    except EmbeddedServerError as exc:
        pytest.skip(str(exc))
    pg = PostgresServer(data_dir=base_dir / "pg", binaries=kind)
    assert pg.kind == kind and not pg.is_running and pg.pid is None
    try:
        # From a worker thread on purpose: the server must survive that thread (PDEATHSIG is per-thread).
        await asyncio.to_thread(pg.start)
        assert pg.is_running and pg.startup_seconds is not None
        print(f"\n{kind} PostgreSQL ({pg.bindir}) started in {pg.startup_seconds:.2f}s")
        pg.start()  # idempotent
        assert pg.dsn() == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"

        conn = await asyncpg.connect(pg.dsn())
        try:
            assert await conn.fetchval("SELECT 40 + 2") == 42
            assert await conn.fetchval("SHOW fsync") == "off"
            assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
            assert await conn.fetchval("SHOW max_connections") == "200"
            assert await conn.fetchval("SELECT current_user") == "postgres"
        finally:
            await conn.close()

        pg.create_database("crs-test")  # called from a thread that runs an event loop
        pg.create_database("crs-test")  # no-op the second time
        conn = await asyncpg.connect(pg.dsn("crs-test"))
        try:
            assert await conn.fetchval("SELECT current_database()") == "crs-test"
        finally:
            await conn.close()

        # A crash, then a restart on the same port with the same data.
        port = pg.port
        pg.kill()
        assert not pg.is_running and not _accepts(port)
        pg.start()
        assert pg.port == port
        conn = await asyncpg.connect(pg.dsn("crs-test"))
        await conn.close()

        pid = pg.pid
        assert pid is not None
        pg.stop()
        pg.stop()  # safe twice
        assert not pg.is_running and pg.pid is None
        assert not _wait_gone({pid}) and not _accepts(port)
        assert "ready to accept connections" in pg.log_path.read_text()
    finally:
        pg.stop()


@pytest.mark.skipif(not IS_ROOT, reason="the unprivileged-user path is only taken as root")
def test_postgres_as_root_copies_binaries_it_cannot_reach(base_dir: Path) -> None:
    try:
        bindir, _ = find_postgres_bindir("pgserver")
    except EmbeddedServerError as exc:
        pytest.skip(str(exc))
    # A private (mode 700) copy of the pgserver tree, like a venv under /root.
    private = Path(tempfile.mkdtemp(prefix="crs-test-private-"))
    try:
        package = bindir.parent.parent
        shutil.copytree(package / "pginstall", private / "pgserver" / "pginstall", symlinks=True)
        libs = package.parent / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, private / "pgserver.libs", symlinks=True)
        pg = PostgresServer(data_dir=base_dir / "pg", bindir=private / "pgserver" / "pginstall" / "bin")
        assert pg.kind == "pgserver"
        try:
            pg.start()
            print(f"\npgserver PostgreSQL from a readable copy started in {pg.startup_seconds:.2f}s")
            assert (base_dir / "pg").stat().st_uid != 0
            assert oct(private.stat().st_mode & 0o777) == oct(0o700)  # untouched
        finally:
            pg.stop()
    finally:
        shutil.rmtree(private, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="the unprivileged-user path is only taken as root")
def test_postgres_as_root_explains_an_unreachable_data_dir() -> None:
    private = Path(tempfile.mkdtemp(prefix="crs-test-private-"))  # mode 700, not ours to chmod
    try:
        pg = PostgresServer(data_dir=private / "pg")
        with pytest.raises(EmbeddedServerError, match=r"cannot reach data_dir .*mode 0700"):
            pg.start()
        assert not pg.is_running
        assert oct(private.stat().st_mode & 0o777) == oct(0o700)
    finally:
        shutil.rmtree(private, ignore_errors=True)


async def test_redis_set_get_kill_restart_same_port_empty(base_dir: Path) -> None:
    shard = RedisServer(name="shard-0", data_dir=base_dir / "shard-0", maxmemory="64mb")
    try:
        shard.start()
        shard.start()  # idempotent
        port = shard.port
        assert shard.url == f"redis://127.0.0.1:{port}/0" and shard.host == "127.0.0.1"
        client = aioredis.Redis.from_url(shard.url)
        try:
            await client.set("card:1", "account:7")
            assert await client.get("card:1") == b"account:7"
            assert (await client.config_get("maxmemory-policy"))["maxmemory-policy"] == "allkeys-lru"
            assert (await client.config_get("bind"))["bind"] == "127.0.0.1"
        finally:
            await client.aclose()

        shard.kill()
        assert not shard.is_running and shard.pid is None and not _accepts(port)

        shard.restart()
        assert shard.is_running and shard.port == port
        client = aioredis.Redis.from_url(shard.url)
        try:
            assert await client.get("card:1") is None  # came back empty
            assert await client.dbsize() == 0
        finally:
            await client.aclose()
        pid = shard.pid
        assert pid is not None
        shard.stop()
        shard.stop()  # safe twice
        assert not _wait_gone({pid}) and not _accepts(port)
    finally:
        shard.stop()


def test_stack_with_two_shards_starts_and_leaves_no_processes() -> None:
    before = _children(os.getpid())
    stack = EmbeddedStack(shards=2)
    base = stack.base_dir
    with stack:
        assert list(stack.shard_urls()) == ["shard-0", "shard-1"]
        assert len({stack.postgres.port, *(shard.port for shard in stack.redis)}) == 3
        servers = {stack.postgres.pid, *(shard.pid for shard in stack.redis)}
        assert None not in servers
        started = {pid for pid in servers if pid is not None}
        assert started <= _children(os.getpid())
        backends = _children(stack.postgres.pid or -1)  # checkpointer, walwriter, ...
        assert backends
        assert (base / "postgres.log").exists() and (base / "redis" / "shard-1" / "redis.log").exists()
        stack.postgres.create_database("crs")
    stack.stop()  # safe twice
    assert not _wait_gone(started | backends)
    assert _children(os.getpid()) <= before
    assert not base.exists()


def test_killed_parent_takes_its_servers_down(base_dir: Path) -> None:
    script = textwrap.dedent(
        """
        import json, sys, time
        from pathlib import Path
        from devstack import EmbeddedStack
        stack = EmbeddedStack(base_dir=Path(sys.argv[1]), shards=1)
        stack.start()  # starts the servers from worker threads
        print(json.dumps([stack.postgres.pid, stack.redis[0].pid]), flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(base_dir / "stack")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the child did not start its stack"
        pids = set(json.loads(line))
        assert all(_pid_alive(pid) for pid in pids)
        child.send_signal(signal.SIGKILL)  # no atexit, no finally: only PR_SET_PDEATHSIG can help
        child.wait()
        assert not _wait_gone(pids), "servers outlived their killed parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_garbage_collected_server_warns_and_stops(base_dir: Path) -> None:
    shard = RedisServer(name="leaky", data_dir=base_dir / "leaky")
    shard.start()
    pid = shard.pid
    assert pid is not None
    with pytest.warns(ResourceWarning, match="garbage-collected while running"):
        del shard
        gc.collect()
    assert not _wait_gone({pid})


def test_arguments_are_checked_at_once(base_dir: Path) -> None:
    with pytest.raises(ValueError, match="binaries"):
        PostgresServer(data_dir=base_dir / "pg", binaries="docker")
    with pytest.raises(ValueError, match="port"):
        PostgresServer(data_dir=base_dir / "pg", port=70000)
    with pytest.raises(ValueError, match="not both"):
        PostgresServer(data_dir=base_dir / "pg", binaries="system", bindir=base_dir)
    with pytest.raises(EmbeddedServerError, match="no executable initdb"):
        PostgresServer(data_dir=base_dir / "pg", bindir=base_dir)
    with pytest.raises(ValueError, match="maxmemory"):
        RedisServer(name="shard-0", data_dir=base_dir / "r", maxmemory="lots")
    with pytest.raises(ValueError, match="name"):
        RedisServer(name="../etc", data_dir=base_dir / "r")
    with pytest.raises(ValueError, match="shards"):
        EmbeddedStack(base_dir=base_dir / "s", shards=-1)
    with pytest.raises(ValueError, match="timeout"):
        RedisServer(name="shard-0", data_dir=base_dir / "r").start(timeout=0)
    with pytest.raises(ValueError, match="prefer"):
        find_postgres_bindir("docker")
    assert find_redis_server().name == "redis-server"
    port = free_port()
    assert 0 < port < 65536 and not _accepts(port)
