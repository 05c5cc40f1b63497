"""The embedded environment: servers + keys + schema + demo data + node processes.

`crs dev` and the test suite both use it (the launcher a user runs is the one the tests run).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.crypto import encode_key, new_key
from server.demo import load_demo
from server.embedded import EmbeddedStack, free_port
from server.settings import Settings, ShardAddress, load_settings, settings_to_env
from server.store.db import active_data_key, create_pool
from server.store.migrate import migrate


def dev_keys() -> dict[str, str]:
    """Fresh random keys for a throwaway environment (never written to the repository)."""
    return {"CRS_FINGERPRINT_KEYS": f"1:{encode_key(new_key())}", "CRS_KEK": encode_key(new_key())}


async def prepare_database(settings: Settings, *, customers: int, seed: int = 1,
                           out: TextIO | None = None) -> None:
    await migrate(settings.pg_dsn)
    if customers <= 0:
        return
    pool = await create_pool(replace(settings, pg_pool_min=1, pg_pool_max=2))
    try:
        dek = await active_data_key(pool, settings.keyring())
    finally:
        await pool.close()
    await load_demo(settings.pg_dsn, settings.keyring(), dek, customers=customers, seed=seed, out=out)


@dataclass
class NodeProcess:
    """A `crs serve` child process."""

    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_node(settings: Settings, *, log_path: Path, extra_env: dict[str, str] | None = None,
               ready_timeout: float = 60.0) -> NodeProcess:
    """Start `crs serve` with these settings and wait until every worker answers SERVING."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")}
    env.update(settings_to_env(settings))
    env.update(extra_env or {})
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    node = NodeProcess(settings, proc, log_path)
    try:
        wait_serving(node.address, timeout=ready_timeout, proc=proc)
    except BaseException:
        node.stop()
        raise
    return node


def wait_serving(address: str, *, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node process exited with code {proc.returncode} before serving")
        try:
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
        except grpc.RpcError as exc:
            last = exc.code().name
        time.sleep(0.2)
    raise TimeoutError(f"node at {address} not SERVING after {timeout:.0f}s (last: {last})")


@dataclass
class DevEnvironment:
    """PostgreSQL + Redis shards + keys + schema (+ demo data). Nodes are started on demand."""

    shards: int = 4
    customers: int = 0
    base_dir: Path | None = None
    pg_binaries: str = "auto"
    keep: bool = False
    stack: EmbeddedStack | None = None
    keys: dict[str, str] = field(default_factory=dev_keys)
    nodes: list[NodeProcess] = field(default_factory=list)

    def start(self, *, out: TextIO | None = None) -> Settings:
        self.stack = EmbeddedStack(base_dir=self.base_dir, shards=self.shards, pg_binaries=self.pg_binaries,
                                   keep=self.keep)
        try:
            self.stack.start()
            self.stack.postgres.create_database("crs")
            settings = self.settings()
            asyncio.run(prepare_database(settings, customers=self.customers, out=out))
        except BaseException:
            self.stop()
            raise
        return settings

    def settings(self, **overrides: object) -> Settings:
        assert self.stack is not None, "start() first"
        env = dict(self.keys)
        env["CRS_PG_DSN"] = self.stack.postgres.dsn("crs")
        settings = load_settings(env)
        shards = tuple(ShardAddress(name=name, url=url) for name, url in self.stack.shard_urls().items())
        return replace(settings, redis_shards=shards, **overrides)  # type: ignore[arg-type]

    def start_node(self, *, workers: int = 1, port: int | None = None, **overrides: object) -> NodeProcess:
        assert self.stack is not None
        settings = self.settings(grpc_port=port or free_port(), workers=workers, metrics_port=free_port(),
                                 **overrides)
        log_dir = Path(self.stack.base_dir) / "logs"
        log_dir.mkdir(exist_ok=True)
        node = start_node(settings, log_path=log_dir / f"node-{settings.grpc_port}.log")
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        if self.stack is not None:
            self.stack.stop()
