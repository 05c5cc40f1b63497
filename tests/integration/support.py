"""What integration tests share besides fixtures: client handles, the record of the secrets a test
sent (for the PCI scan), test data helpers, and where servers come from (see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from devstack.environment import DevEnvironment, NodeProcess
from server import cache_keys as ck
from server import rpc
from server.proto import crs_pb2 as pb
from server.settings import Settings, settings_to_env

# Which PostgreSQL binaries the suite's own servers use: auto (PATH first), system or pgserver.
PG_BINARIES = os.environ.get("CRS_TEST_PG_BINARIES", "auto")
# Already-running servers for the shared environment (both or neither): a superuser DSN, Redis URLs.
EXTERNAL_PG_DSN = os.environ.get("CRS_TEST_PG_DSN", "").strip()
EXTERNAL_REDIS_URLS = tuple(u.strip() for u in os.environ.get("CRS_TEST_REDIS_URLS", "").split(",") if u.strip())
if bool(EXTERNAL_PG_DSN) != bool(EXTERNAL_REDIS_URLS):
    raise pytest.UsageError("set both CRS_TEST_PG_DSN and CRS_TEST_REDIS_URLS, or neither")
EXTERNAL = bool(EXTERNAL_PG_DSN)
# The serving model every node of the suite runs (CRS_SERVING_MODEL: aio or hybrid); "" = the default.
SERVING_MODEL = os.environ.get("CRS_TEST_SERVING_MODEL", "").strip()

T = TypeVar("T")


# Nodes the tests start drain for 0.1 s on SIGTERM, not the product's 1 s: the suite stops some 70
# of them. The tests of drains themselves (test_rollout, test_node_lifecycle) set the product's.
NODE_DEFAULTS: dict[str, object] = {"drain_delay": 0.1}


def shared_env(**options: Any) -> DevEnvironment:
    """The session's environment: on the external servers when CRS_TEST_PG_DSN/CRS_TEST_REDIS_URLS
    are set (a fresh database crs_test_<random>; the Redis DBs flushed), else on servers of its own."""
    if EXTERNAL:
        return DevEnvironment(external_pg_dsn=EXTERNAL_PG_DSN, external_redis_urls=EXTERNAL_REDIS_URLS,
                              database=f"crs_test_{secrets.token_hex(4)}", serving_model=SERVING_MODEL,
                              node_defaults=NODE_DEFAULTS, **options)
    return DevEnvironment(pg_binaries=PG_BINARIES, serving_model=SERVING_MODEL, node_defaults=NODE_DEFAULTS, **options)


def own_env(**options: Any) -> DevEnvironment:
    """An environment on servers of its own, even when external servers are configured: for modules
    that kill, stop or add servers, and for those that load demo data of their own (the demo data is
    deterministic, so its cache keys, e.g. tok:<token> and cus:<id>, would collide with the shared
    environment's on the same Redis databases, and the invalidation channel is server-wide)."""
    return DevEnvironment(pg_binaries=PG_BINARIES, serving_model=SERVING_MODEL, node_defaults=NODE_DEFAULTS, **options)


def running(env: DevEnvironment) -> Iterator[DevEnvironment]:
    """A module fixture's body: `yield from running(own_env(...))` starts the servers, then stops them."""
    env.start()
    try:
        yield env
    finally:
        env.stop()


@dataclass
class Clients:
    node: NodeProcess
    channel: grpc.Channel
    lookup: rpc.Stub
    admin: rpc.Stub
    identity: rpc.Stub


@dataclass
class UsedSecrets:
    """Every clear PAN and account number a test sent, for the PCI scan at the end; and every
    national id (normalised: no separators) and date of birth (YYYY-MM-DD), for the PII scan."""

    pans: set[str] = field(default_factory=set)
    account_numbers: set[str] = field(default_factory=set)
    identity: set[str] = field(default_factory=set)


def clients_of(node: NodeProcess) -> Clients:
    channel = node.channel("admin")
    return Clients(node, channel, rpc.stub(channel, "LookupService"), rpc.stub(channel, "AdminService"),
                   rpc.stub(channel, "IdentityService"))


def node_logs(env: DevEnvironment) -> str:
    logs = env.work_dir / "logs"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log")))


def errors_logged(node: NodeProcess, since: int) -> list[str]:
    """The node's log lines at ERROR written after byte `since` (its log's size taken earlier)."""
    with node.log_path.open("rb") as log:
        log.seek(since)
        return [line for line in log.read().decode(errors="replace").splitlines() if '"level":"ERROR"' in line]


def until(what: str, condition: Callable[[], bool], within: float, *, poll: float = 0.02,
          check: Callable[[], None] = lambda: None) -> None:
    """Wait until `condition()`; `check()` runs at each try (to fail early). AssertionError naming
    `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        check()
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(poll)


def log_records(text: str, msg: str) -> list[dict[str, Any]]:
    """The JSON log records of a node's log text whose message is `msg`. Read where each record starts,
    not line by line: a worker SIGKILLed mid-line leaves its last record cut short, and the next record
    (the supervisor's) runs on after it on the same line."""
    decoder, found = json.JSONDecoder(), []
    for line in text.splitlines():
        start = line.find('{"ts":')
        while start >= 0:
            with contextlib.suppress(ValueError):
                record, _ = decoder.raw_decode(line, start)
                if record.get("msg") == msg:
                    found.append(record)
            start = line.find('{"ts":', start + 1)
    return found


def metric(node: NodeProcess, name: str, **labels: str) -> float:
    """Sum of the node's samples of `name` whose labels include `labels` (0 when none)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.settings.metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_metric(node: NodeProcess, name: str, value: float, within: float = 15.0, **labels: str) -> float:
    """Wait until `metric(node, name, **labels)` is `value`; the seconds that took. AssertionError
    after `within`."""
    started = time.monotonic()
    while metric(node, name, **labels) != value:
        assert time.monotonic() - started < within, f"{name}{labels} never became {value}"
        time.sleep(0.1)
    return time.monotonic() - started


def status_of(call: object) -> grpc.StatusCode:
    """The status `call()` ends with (OK when it returns)."""
    assert callable(call)
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def expect_code(call: object, code: grpc.StatusCode) -> grpc.RpcError:
    """Run `call()` and return its RpcError, failing unless its status is `code`."""
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


def new_customer(admin: rpc.Stub, name: str = "Test Customer") -> pb.Customer:
    reply: pb.Customer = admin.CreateCustomer(pb.CreateCustomerRequest(display_name=name), timeout=5)
    return reply


_counter = iter(range(1, 10**9))


def fresh_pan(used: UsedSecrets, length: int = 16) -> str:
    """A Luhn-valid PAN in the reserved test BIN range 99901x, unique in this run, recorded as used."""
    from server.pan import luhn_check_digit

    body = f"99901{os.getpid() % 10}" + f"{next(_counter):0{length - 7}d}"
    pan = body + luhn_check_digit(body)
    used.pans.add(pan)
    return pan


def fresh_account_number(used: UsedSecrets) -> str:
    number = f"8{os.getpid() % 1000:03d}{next(_counter):08d}"
    used.account_numbers.add(number)
    return number


@contextmanager
def redis_servers(base: Path, names: list[str]) -> Iterator[list[Any]]:
    """Bare redis-servers (devstack's), one per name, stopped on exit: for tests of the cache tier
    without a node."""
    from devstack import RedisServer

    started = [RedisServer(name=name, data_dir=base / name) for name in names]
    try:
        for s in started:
            s.start()
        yield started
    finally:
        for s in started:
            s.stop()



class FreezingProxy:
    """A TCP proxy on 127.0.0.1 to `upstream_port` whose open connections can be frozen: from `freeze()`
    on, what either side sends on them vanishes and nothing is closed, as a peer looks that is gone
    without a FIN (its host lost, a partition). Connections opened later are forwarded normally.
    `reset(n)` instead resets every open connection and the next `n` new ones before a byte is
    forwarded, as a server's listener closing with connections in its queue resets them.
    Threads, so it serves sync and asyncio tests alike; `with FreezingProxy(port) as proxy:`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, socket.socket, list[bool]]] = []
        self._closed = False
        self._to_reset = 0
        self.accepted = 0
        self.reset_connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> FreezingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def freeze(self) -> None:
        with self._lock:
            for _, _, frozen in self._open:
                frozen[0] = True

    def reset(self, next_connections: int = 0) -> None:
        with self._lock:
            self._to_reset = next_connections
            conns, self._open = self._open, []
        for client, upstream, frozen in conns:
            frozen[0] = True
            _reset(client)
            upstream.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:            # closed
                return
            with self._lock:
                self.accepted += 1
                if self._to_reset > 0:
                    self._to_reset -= 1
                    self.reset_connections += 1
                    _reset(client)
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:            # the upstream is down: so is this connection
                client.close()
                continue
            frozen = [False]
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._open.append((client, upstream, frozen))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, frozen), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, frozen: list[bool]) -> None:
        try:
            while data := src.recv(65536):
                if not frozen[0]:
                    dst.sendall(data)
        except OSError:
            pass
        if not frozen[0]:              # one side closed: close the other, as a proxy does
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._open = self._open, []
        self._listener.close()
        for client, upstream, _ in conns:
            client.close()
            upstream.close()


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP reset (SO_LINGER 0), not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def on_database(dsn: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """`work(connection)` on a connection of its own to `dsn`, from synchronous test code."""
    import asyncio

    import asyncpg

    async def run() -> T:
        conn = await asyncpg.connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


REPO = Path(__file__).resolve().parents[2]


def crs_command(env: DevEnvironment, *args: str, stdin: str = "", overrides: dict[str, str] | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`crs ARGS` in a child process, from the repository, with the environment's settings as CRS_*
    variables (then `overrides`) and none of this process's own."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | settings_to_env(env.settings())
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, env=child | (overrides or {}),
                          capture_output=True, input=stdin, text=True, timeout=timeout)


def metrics_dir(pid: int) -> Path:
    """The shared metrics directory (PROMETHEUS_MULTIPROC_DIR) a node's worker process was started with."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return Path(next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")))


def worker_pids(node: NodeProcess) -> set[int]:
    """The node's worker processes (not multiprocessing's resource tracker, its other child)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(node.proc.pid)], capture_output=True, text=True).stdout
    pids = set()
    for pid in map(int, out.split()):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except FileNotFoundError:
            pass
    return pids


def sql(dsn: str, query: str, *args: Any) -> list[Any]:
    """The rows of one query (asyncpg Records)."""
    return list(on_database(dsn, lambda conn: conn.fetch(query, *args)))


def card_key(settings: Settings, pan: str) -> str:
    """A card's cache key as the nodes name it: under the active BIN table version (server/cache_keys.py)."""
    from server.store.bins import active_version

    keyring = settings.keyring()
    version = on_database(settings.pg_dsn, active_version)
    return ck.card_key(keyring.fingerprint_version, keyring.fingerprint(pan), version)


class TableLocked:
    """ACCESS EXCLUSIVE on `table`, taken by a session of its own, until the `with` block ends (`seconds`
    at most): every query of it waits. Not for a fixed time from the lock: a busy machine could reach the
    block's calls only after that. With `statement` (a SELECT ... FOR UPDATE), what it locks instead."""

    def __init__(self, dsn: str, table: str, seconds: float = 30.0, *, statement: str = "") -> None:
        self.dsn, self.table, self.seconds = dsn, table, seconds
        self.statement = statement or f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        self.held = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                await conn.execute(self.statement)
                self.held.set()
                await asyncio.get_running_loop().run_in_executor(None, self.release.wait, self.seconds)
        finally:
            await conn.close()

    def __enter__(self) -> TableLocked:
        self.thread.start()
        assert self.held.wait(10), f"could not lock {self.table}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join(30)


def settled(read: Callable[[], T], what: str) -> T:
    """`read()` once a node's metrics flush adds nothing: two reads a flush and a half apart agree
    (per-call counts reach /metrics at the node's next flush, every FLUSH_INTERVAL; later on a busy
    machine)."""
    from server.metrics import FLUSH_INTERVAL

    deadline = time.monotonic() + 30
    last = read()
    while True:
        time.sleep(FLUSH_INTERVAL * 1.5)
        now = read()
        if now == last:
            return now
        assert time.monotonic() < deadline, f"{what} never settled"
        last = now
