"""PostgreSQL + N Redis shards in one base directory, started and stopped together."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

from devstack.postgres import PostgresServer
from devstack.processes import EmbeddedServerError, make_dirs, require_kw_path
from devstack.redis import RedisServer
from devstack.runas import pg_run_as

# --------------------------------------------------------------------------------------------------
# The whole stack
# --------------------------------------------------------------------------------------------------


_live_stacks: weakref.WeakSet[EmbeddedStack] = weakref.WeakSet()


def _stop_stacks_at_exit() -> None:
    """Stacks first (atexit runs this before the servers' own hook: this module registers later)."""
    for stack in list(_live_stacks):
        with contextlib.suppress(Exception):
            stack.stop()


atexit.register(_stop_stacks_at_exit)


class EmbeddedStack:
    """PostgreSQL + N Redis shards named shard-0..shard-{N-1}, in one base directory.

    With ``replicas=R`` every shard has R more copies: independent redis-servers named
    ``shard-K-replica-J`` that the nodes write to alongside the primary (client-side replication,
    mcrouter style: no REPLICAOF), see docs/decisions.md "Replicated shards".

    With ``pg_replica=True`` PostgreSQL has a hot standby, ``<base>/postgres-replica/``, streaming
    from the primary synchronously (a commit waits until the standby has flushed it, so promoting it
    loses no acknowledged write); see docs/devstack.md.

    Layout: ``<base>/postgres/`` (data), ``<base>/postgres.log``, ``<base>/redis/shard-K/`` (config,
    ``redis.log``; replicas in ``<base>/redis/shard-K-replica-J/``). With ``base_dir=None`` the base is
    a fresh temporary directory, removed by ``stop()`` unless ``keep=True``; a given base_dir is never removed.
    """

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        shards: int = 4,
        replicas: int = 0,
        pg_replica: bool = False,
        pg_binaries: str = "auto",
        pg_bindir: Path | None = None,
        keep: bool = False,
    ) -> None:
        if isinstance(shards, bool) or not isinstance(shards, int) or not 0 <= shards <= 64:
            raise ValueError(f"shards must be an int in 0..64, not {shards!r}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= 4:
            raise ValueError(f"replicas must be an int in 0..4, not {replicas!r}")
        if not isinstance(keep, bool):
            raise TypeError(f"keep must be a bool, not {type(keep).__name__}")
        if not isinstance(pg_replica, bool):
            raise TypeError(f"pg_replica must be a bool, not {type(pg_replica).__name__}")
        self.keep = keep
        self._owns_base = base_dir is None
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="crs-embedded-"))
            self.base_dir.chmod(0o755)  # ours; PostgreSQL may run as another user and must traverse it
        else:
            self.base_dir = require_kw_path("base_dir", base_dir)
        try:
            self.postgres = PostgresServer(
                data_dir=self.base_dir / "postgres",
                bindir=pg_bindir,
                binaries=pg_binaries,
                log_path=self.base_dir / "postgres.log",
            )
            self.pg_replica = PostgresServer(
                data_dir=self.base_dir / "postgres-replica", primary=self.postgres,
                log_path=self.base_dir / "postgres-replica.log",
            ) if pg_replica else None
            self.redis = [
                RedisServer(name=f"shard-{i}", data_dir=self.base_dir / "redis" / f"shard-{i}") for i in range(shards)
            ]
            # replica_servers[i]: shard-i's replicas, in order (replica-1, replica-2, ...).
            self.replica_servers = [
                [RedisServer(name=f"shard-{i}-replica-{j}", data_dir=self.base_dir / "redis" / f"shard-{i}-replica-{j}")
                 for j in range(1, replicas + 1)]
                for i in range(shards)
            ]
        except BaseException:
            self._remove_base()
            raise
        self._started = False
        self._lock = threading.RLock()
        _live_stacks.add(self)

    def __repr__(self) -> str:
        return f"<EmbeddedStack {self.base_dir} postgres={self.postgres!r} shards={len(self.redis)}>"

    def shard_urls(self) -> dict[str, str]:
        """Shard name -> its primary's URL."""
        return {server.name: server.url for server in self.redis}

    def shard_copies(self) -> dict[str, list[str]]:
        """Shard name -> the URLs of its copies, the primary first."""
        return {server.name: [server.url, *(r.url for r in replicas)]
                for server, replicas in zip(self.redis, self.replica_servers, strict=True)}

    def _servers(self) -> list[PostgresServer | RedisServer]:
        """Every server, in start order: all but the PostgreSQL standby start together, then it."""
        standby = [self.pg_replica] if self.pg_replica is not None else []
        return [self.postgres, *self.redis, *(r for replicas in self.replica_servers for r in replicas), *standby]

    def start(self) -> None:
        """Start PostgreSQL and every shard concurrently; on any failure stop all and raise."""
        with self._lock:
            if self._started and all(server.is_running for server in self._servers()):
                return
            self._started = True
            if self._owns_base and not self.base_dir.exists():
                raise EmbeddedServerError(f"{self!r} was stopped and its base directory removed; make a new one")
            make_dirs(self.base_dir, open_up=pg_run_as() is not None)
            servers = [server for server in self._servers() if server is not self.pg_replica]
            with concurrent.futures.ThreadPoolExecutor(
                max_workers=len(servers), thread_name_prefix="crs-embedded-start"
            ) as pool:
                futures = [pool.submit(server.start) for server in servers]
                try:
                    concurrent.futures.wait(futures)
                except BaseException:  # e.g. KeyboardInterrupt: let the starts finish, then undo them
                    concurrent.futures.wait(futures)
                    self._stop_servers()
                    raise
            errors = [exc for exc in (future.exception() for future in futures) if exc is not None]
            if errors:
                self._stop_servers()
                first = errors[0]
                for other in errors[1:]:
                    first.add_note(f"also: {other}")
                raise first
            if self.pg_replica is not None:
                try:
                    self.pg_replica.start()   # copies the running primary on first start
                    self.postgres.require_synchronous_standby()
                except BaseException:
                    self._stop_servers()
                    raise

    def _stop_servers(self) -> None:
        servers = self._servers()
        for server in servers:  # signal all first, so they shut down in parallel
            server._signal_stop()
        for server in servers:
            server.stop()

    def _remove_base(self) -> None:
        if self._owns_base and not self.keep:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop everything it started and remove its temporary base directory. Idempotent."""
        with self._lock:
            self._stop_servers()
            self._remove_base()
            _live_stacks.discard(self)

    def __enter__(self) -> EmbeddedStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        servers: list[PostgresServer | RedisServer] = []
        with contextlib.suppress(Exception):
            servers = self._servers()
        if any(server.is_running for server in servers):
            warnings.warn(
                f"{self!r} was garbage-collected while running; call stop()",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
        with contextlib.suppress(Exception):
            self.stop()
