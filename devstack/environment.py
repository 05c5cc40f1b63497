"""The embedded environment: servers + keys + schema + demo data + node processes.

`crs-dev up` and the test suite both use it (the launcher a user runs is the one the tests run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.bins import sample_rows
from devstack.demo import load_demo
from devstack.pki import DevPki, write_dev_pki
from devstack.processes import LogFile, free_port, reap_killed
from devstack.stack import EmbeddedStack
from server.bins import parse_row
from server.crypto import generate_keys
from server.settings import Settings, load_settings, settings_to_env
from server.store import bins as bin_store
from server.store.db import active_data_key, create_pool
from server.store.migrate import migrate
from shard_router.addresses import ShardAddress


def dev_keys() -> dict[str, str]:
    """Fresh random keys for a throwaway environment (never written to the repository)."""
    return generate_keys()


SERVICE_ROLE = "crs_node"   # the login role nodes use: a member of crs_app (migration 0003)
OPERATOR_ROLE = "crs_sre"   # the login role for crs shards ...: a member of crs_operator (migration 0004)
STACK_DUMP_WAIT = 1.0       # seconds a node that did not drain gets to write its threads' stacks


async def prepare_database(settings: Settings, *, customers: int, seed: int = 1,
                           out: TextIO | None = None, service_role: str | None = None,
                           operator_role: str = OPERATOR_ROLE, passwords: dict[str, str] | None = None) -> None:
    """Migrate (as the owner in `settings.pg_dsn`), create the nodes' login role, load demo data.

    `passwords` (role -> password) gives roles created here a password (servers that are not 'trust')."""
    await migrate(settings.pg_dsn)
    if service_role:
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            for role, group in ((service_role, "crs_app"), (operator_role, "crs_operator")):
                if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                    password = (passwords or {}).get(role)
                    with_password = f" PASSWORD {_sql_literal(password)}" if password else ""
                    await conn.execute(f'CREATE ROLE "{role}" LOGIN{with_password} IN ROLE {group}')
        finally:
            await conn.close()
    if customers <= 0:
        return
    pool = await create_pool(replace(settings, pg_pool_min=1, pg_pool_max=2))
    try:
        dek = await active_data_key(pool, settings.keyring())
    finally:
        await pool.close()
    await load_demo(settings.pg_dsn, settings.keyring(), dek, customers=customers, seed=seed, out=out)
    await load_sample_bins(settings.pg_dsn, SAMPLE_BIN_RANGES, seed=seed)


SAMPLE_BIN_RANGES = 10_000   # made-up issuer ranges in the dev stack's BIN table (devstack/bins.py)


async def load_sample_bins(dsn: str, ranges: int, *, seed: int = 1) -> int:
    """Import a synthetic BIN table (version 1 of a fresh database) so not-on-us cards route."""
    rows = [parse_row(r) for r in sample_rows(ranges, seed)]
    conn = await asyncpg.connect(dsn)
    try:
        return await bin_store.import_table(conn, rows, source_file="devstack-sample.csv", sha256="-", rejected=0)
    finally:
        await conn.close()


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _dsn_with(dsn: str, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    """`dsn` (a postgresql:// URL) with its user, password and/or database replaced; the rest kept."""
    parts = urllib.parse.urlsplit(dsn)
    netloc = parts.netloc
    if user is not None:
        hostport = netloc.rpartition("@")[2]
        auth = urllib.parse.quote(user, safe="")
        if password is not None:
            auth += ":" + urllib.parse.quote(password, safe="")
        netloc = f"{auth}@{hostport}"
    path = "/" + urllib.parse.quote(database, safe="") if database is not None else parts.path
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


# Dev callers and their scopes: an operator with everything, a payment switch with lookups only, a
# downstream system that follows the change feed and nothing else.
DEV_CLIENTS = {
    "admin": ["lookup:card", "lookup:account", "lookup:customer", "admin:write", "feed:read", "identity:read"],
    "switch": ["lookup:card", "lookup:account"],
    "csr": ["lookup:customer", "identity:read"],     # customer service: profiles and identity, no writes
    "feed": ["feed:read"],
}


def dev_clients_config() -> dict[str, object]:
    return {"clients": {cid: {"scopes": scopes, "cert_names": [cid]} for cid, scopes in DEV_CLIENTS.items()},
            "revoked_serials": []}


@dataclass
class NodeProcess:
    """A `crs serve` child process."""

    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path

    pki: DevPki | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    def channel(self, client: str = "admin") -> grpc.Channel:
        """A channel to this node as `client` (mutual TLS with that client's dev certificate)."""
        return open_channel(self.address, self.pki, client)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the drain; a node still there after `timeout` writes every thread's
        stack to its log (SIGUSR1, server/serve.py) and is killed: the log says what held it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGUSR1)
                time.sleep(STACK_DUMP_WAIT)
                self.proc.kill()
                reap_killed(self.proc)
        return self.proc.returncode

    def log_tail(self, lines: int = 200) -> str:
        """The last lines of this node's log, for an assertion message."""
        return LogFile(self.log_path).tail(lines)


def open_channel(address: str, pki: DevPki | None, client: str = "admin",
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    if pki is None:
        return grpc.insecure_channel(address, options=list(options))
    cert, key = pki.client_cert(client)
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes(),
                                         private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
    # The dev server certificate names localhost and 127.0.0.1 (a multi-address target names neither).
    return grpc.secure_channel(address, creds,
                               options=[*options, ("grpc.ssl_target_name_override", "localhost")])


def start_node(settings: Settings, *, log_path: Path, extra_env: dict[str, str] | None = None,
               ready_timeout: float = 60.0, pki: DevPki | None = None) -> NodeProcess:
    """Start `crs serve` with these settings and wait until every worker answers SERVING."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")}
    env.update(settings_to_env(settings))
    env.update(extra_env or {})
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    node = NodeProcess(settings, proc, log_path, pki)
    try:
        wait_serving(node.address, timeout=ready_timeout, proc=proc, pki=pki)
    except BaseException:
        node.stop()
        raise
    return node


def wait_serving(address: str, *, timeout: float, proc: subprocess.Popen[bytes] | None = None,
                 pki: DevPki | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node process exited with code {proc.returncode} before serving")
        try:
            with open_channel(address, pki) as channel:
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
    """PostgreSQL + Redis shards + keys + schema (+ demo data). Nodes are started on demand.

    With tls=True (the default of `crs-dev up` and the tests) nodes serve mutual TLS with a generated
    dev PKI and the clients file below; with tls=False they serve plaintext to anonymous callers.
    Nodes log in to PostgreSQL as the restricted service role, never as the owner.

    External servers (a CI's service containers), both or neither: with `external_pg_dsn` (a superuser
    DSN) and `external_redis_urls` (the shards, named shard-0..N-1; `shards` is then ignored) no server
    is started. start() then creates the database `database` (default crs_<random>) and the login roles
    <database>_node and <database>_sre with random passwords, and FLUSHDBs each Redis URL's database;
    stop() drops that database and those roles (unless keep). `stack` stays None; use `work_dir` and
    `shard_urls()`, which work in both modes.
    """

    shards: int = 4
    replicas: int = 0          # more copies of every shard (embedded servers only)
    pg_replica: bool = False   # a PostgreSQL hot standby: nodes read misses from it, fail over to it
    tls: bool = False
    customers: int = 0
    base_dir: Path | None = None
    pg_binaries: str = "auto"
    keep: bool = False
    stack: EmbeddedStack | None = None
    keys: dict[str, str] = field(default_factory=dev_keys)
    nodes: list[NodeProcess] = field(default_factory=list)

    pki: DevPki | None = None
    clients_file: Path | None = None

    serving_model: str = ""    # CRS_SERVING_MODEL of every node started here ("" = the product's default)
    node_defaults: dict[str, object] = field(default_factory=dict)   # settings of every node started here
    external_pg_dsn: str | None = None
    external_redis_urls: tuple[str, ...] = ()
    database: str | None = None
    _work_dir: Path | None = field(default=None, repr=False)
    _passwords: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.external_redis_urls = tuple(self.external_redis_urls)
        if bool(self.external_pg_dsn) != bool(self.external_redis_urls):
            raise ValueError("give both external_pg_dsn and external_redis_urls, or neither")
        if self.replicas and self.external_pg_dsn:
            raise ValueError("replicas need embedded servers: external_redis_urls name primaries only")
        if self.pg_replica and self.external_pg_dsn:
            raise ValueError("pg_replica needs the embedded PostgreSQL: an external one brings its own replicas")
        if self.database is None:
            self.database = f"crs_{secrets.token_hex(4)}" if self.external else "crs"

    @property
    def external(self) -> bool:
        """True when the servers are already running elsewhere (nothing of ours to start or kill)."""
        return bool(self.external_pg_dsn)

    @property
    def work_dir(self) -> Path:
        """Where logs, the dev PKI and test files go: the stack's base directory, or our own."""
        if self.stack is not None:
            return Path(self.stack.base_dir)
        assert self._work_dir is not None, "start() first"
        return self._work_dir

    def shard_urls(self) -> dict[str, str]:
        """Shard name -> Redis URL (its primary's), embedded or external."""
        if self.stack is not None:
            return self.stack.shard_urls()
        return {f"shard-{i}": url for i, url in enumerate(self.external_redis_urls)}

    def shard_addresses(self) -> tuple[ShardAddress, ...]:
        """The shards as CRS_REDIS_SHARDS names them, with their replicas."""
        if self.stack is not None:
            return tuple(ShardAddress(name=name, url=urls[0], replicas=tuple(urls[1:]))
                         for name, urls in self.stack.shard_copies().items())
        return tuple(ShardAddress(name=name, url=url) for name, url in self.shard_urls().items())

    @property
    def service_role(self) -> str:
        return f"{self.database}_node" if self.external else SERVICE_ROLE

    @property
    def operator_role(self) -> str:
        return f"{self.database}_sre" if self.external else OPERATOR_ROLE

    def _start_external(self) -> None:
        dsn, database = self.external_pg_dsn, self.database
        assert dsn is not None and database is not None
        self._work_dir = self.base_dir or Path(tempfile.mkdtemp(prefix="crs-env-"))
        for url in self.external_redis_urls:
            with redis.Redis.from_url(url) as client:
                client.flushdb()
        self._passwords = {self.service_role: secrets.token_hex(16), self.operator_role: secrets.token_hex(16)}

        async def create() -> None:
            conn = await asyncpg.connect(dsn, timeout=30)
            try:
                await conn.execute(f'CREATE DATABASE "{database}"')
            finally:
                await conn.close()

        asyncio.run(create())

    def _stop_external(self) -> None:
        if self._work_dir is None:
            return
        if not self.keep:
            dsn = self.external_pg_dsn

            async def drop() -> None:
                conn = await asyncpg.connect(dsn, timeout=30)
                try:
                    force = " WITH (FORCE)" if conn.get_server_version().major >= 13 else ""
                    await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}"{force}')
                    for role in (self.service_role, self.operator_role):
                        await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
                finally:
                    await conn.close()

            try:
                asyncio.run(drop())
            except Exception as exc:   # stop() must not fail; say what was left behind
                warnings.warn(f"could not drop database {self.database} and its roles: {exc}", stacklevel=2)
            if self.base_dir is None:
                shutil.rmtree(self._work_dir, ignore_errors=True)
        self._work_dir = None

    def start(self, *, out: TextIO | None = None) -> Settings:
        if self.external:
            try:
                self._start_external()
            except BaseException:
                self.stop()
                raise
            return self._prepare(out)
        self.stack = EmbeddedStack(base_dir=self.base_dir, shards=self.shards, replicas=self.replicas,
                                   pg_replica=self.pg_replica, pg_binaries=self.pg_binaries, keep=self.keep)
        try:
            self.stack.start()
            assert self.database is not None
            self.stack.postgres.create_database(self.database)
        except BaseException:
            self.stop()
            raise
        return self._prepare(out)

    def _prepare(self, out: TextIO | None) -> Settings:
        """PKI, schema, login roles, demo data: the same on embedded and external servers."""
        try:
            if self.tls:
                self.pki = write_dev_pki(self.work_dir / "pki", tuple(DEV_CLIENTS))
                self.clients_file = self.work_dir / "pki" / "clients.json"
                self.clients_file.write_text(json.dumps(dev_clients_config(), indent=2))
            settings = self.settings()
            owner = replace(settings, pg_dsn=self.admin_dsn)
            asyncio.run(prepare_database(owner, customers=self.customers, out=out, service_role=self.service_role,
                                         operator_role=self.operator_role, passwords=self._passwords))
        except BaseException:
            self.stop()
            raise
        return settings

    def _dsn(self, role: str | None) -> str:
        """The database's DSN as `role` (None: the owner/superuser)."""
        assert self.database is not None
        if self.external_pg_dsn is not None:
            if role is None:
                return _dsn_with(self.external_pg_dsn, database=self.database)
            return _dsn_with(self.external_pg_dsn, user=role, password=self._passwords.get(role),
                             database=self.database)
        assert self.stack is not None, "start() first"
        if role is None:
            return self.stack.postgres.dsn(self.database)
        return self._node_dsn(role, "read-write")

    def _node_dsn(self, role: str, target: str) -> str:
        """`role`'s DSN to the embedded servers: with a standby it names both hosts, the one that
        `target` (libpq's target_session_attrs) prefers first, so a promoted standby is found."""
        assert self.stack is not None
        primary, standby = self.stack.postgres.port, self.stack.pg_replica
        if standby is None:
            return f"postgresql://{role}@127.0.0.1:{primary}/{self.database}"
        ports = [standby.port, primary] if target == "prefer-standby" else [primary, standby.port]
        hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
        return f"postgresql://{role}@{hosts}/{self.database}?target_session_attrs={target}"

    @property
    def read_dsn(self) -> str:
        """What nodes read cache misses from (CRS_PG_READ_DSN): the standby, else the primary; ""
        without a standby."""
        if self.stack is None or self.stack.pg_replica is None:
            return ""
        return self._node_dsn(self.service_role, "prefer-standby")

    @property
    def admin_dsn(self) -> str:
        """The schema owner (superuser here): migrations, demo data, test inspection."""
        return self._dsn(None)

    @property
    def operator_dsn(self) -> str:
        """What an SRE's `crs shards ...` logs in as: the service's rights plus the shard topology."""
        return self._dsn(self.operator_role)

    def settings(self, **overrides: object) -> Settings:
        assert self.stack is not None or self._work_dir is not None, "start() first"
        env = dict(self.keys)
        env["CRS_PG_DSN"] = self._dsn(self.service_role)
        if self.read_dsn:
            env["CRS_PG_READ_DSN"] = self.read_dsn
        if self.pki is not None and self.clients_file is not None:
            env |= {"CRS_TLS_CERT_FILE": str(self.pki.server_cert), "CRS_TLS_KEY_FILE": str(self.pki.server_key),
                    "CRS_TLS_CLIENT_CA_FILE": str(self.pki.ca_cert), "CRS_CLIENTS_FILE": str(self.clients_file)}
        else:
            env |= {"CRS_ALLOW_PLAINTEXT": "true", "CRS_ALLOW_ANONYMOUS": "true"}
        if self.serving_model:
            env["CRS_SERVING_MODEL"] = self.serving_model
        settings = load_settings(env)
        values: dict[str, object] = {"redis_shards": self.shard_addresses()} | overrides   # an override wins
        return replace(settings, **values)  # type: ignore[arg-type]

    def start_node(self, *, workers: int = 1, port: int | None = None, pki: DevPki | None = None,
                   **overrides: object) -> NodeProcess:
        """A `crs serve` with these setting overrides; `pki` when the overrides name another PKI's files."""
        defaults: dict[str, object] = self.node_defaults | {"grpc_port": port or free_port(), "workers": workers,
                                                            "metrics_port": free_port()}
        settings = self.settings(**(defaults | overrides))
        log_dir = self.work_dir / "logs"
        log_dir.mkdir(exist_ok=True)
        node = start_node(settings, log_path=log_dir / f"node-{settings.grpc_port}.log", pki=pki or self.pki)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        if self.stack is not None:
            self.stack.stop()
        self._stop_external()
