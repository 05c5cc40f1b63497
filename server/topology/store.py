"""Where the shard topology lives: PostgreSQL (the source of truth), or a JSON file for an embedded
stack without an operator; plus the PostgreSQL tables around a move (draft, progress, node heartbeats).

Publishing is compare-and-set: a new version is accepted only as current + 1, so two operators (or an
`apply` and an `abort`) can never both move the topology from the same version.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncpg
import orjson

from server.store.db import Conn
from shard_router.topology import Topology, TopologyError, TopologyShard


class TopologyConflict(Exception):
    """Someone else published a topology version first; re-read it and decide again."""


class TopologyFileError(TopologyError):
    """CRS_TOPOLOGY_FILE cannot be used: its directory is missing, or the file cannot be read or does
    not parse. Configuration (exit 2), not a refusal."""


class TopologyStore(Protocol):
    """A topology source a node polls and an operator publishes to."""

    where: str

    async def current(self) -> Topology | None:
        """The topology in force, or None when none was ever published (nodes use CRS_REDIS_SHARDS)."""

    async def current_version(self) -> int:
        """The version in force (0 when none): cheap, for polling."""

    async def publish(self, topology: Topology, *, reason: str) -> None:
        """Store `topology` if its version is the current one + 1, else raise TopologyConflict."""


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


class PgTopologyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.where = "PostgreSQL table shard_topology"

    async def current(self) -> Topology | None:
        row = await self.pool.fetchrow("SELECT version, document FROM shard_topology ORDER BY version DESC LIMIT 1")
        if row is None:
            return None
        try:
            return _topology_from_json(row["document"])
        except TopologyError as exc:   # a newer release's command published it: say so, not just the field
            raise TopologyError(f"shard topology version {row['version']} in PostgreSQL is not one this release"
                                f" can read ({exc}): a newer release published it?") from exc

    async def current_version(self) -> int:
        return int(await self.pool.fetchval("SELECT coalesce(max(version), 0) FROM shard_topology"))

    async def publish(self, topology: Topology, *, reason: str) -> None:
        try:
            inserted = await self.pool.fetchval(
                "INSERT INTO shard_topology (version, document, reason)"
                " SELECT $1::bigint, $2::jsonb, $3"
                " WHERE (SELECT coalesce(max(version), 0) FROM shard_topology) = $1::bigint - 1"
                " RETURNING version",
                topology.version, orjson.dumps(topology.to_document()).decode(), reason)
        except asyncpg.UniqueViolationError:
            inserted = None
        if inserted is None:
            now = await self.current_version()
            raise TopologyConflict(f"cannot publish topology version {topology.version}: version {now} is in force")

    async def history(self, limit: int) -> list[TopologyRecord]:
        rows = await self.pool.fetch(
            "SELECT version, document, reason, created_at, created_by FROM shard_topology"
            " ORDER BY version DESC LIMIT $1", limit)
        return [TopologyRecord(_topology_from_json(r["document"]), r["reason"], r["created_at"], r["created_by"])
                for r in rows]


@dataclass(frozen=True)
class TopologyRecord:
    topology: Topology
    reason: str
    created_at: dt.datetime
    created_by: str


def _topology_from_json(raw: str | bytes) -> Topology:
    return Topology.from_document(orjson.loads(raw))


# --------------------------------------------------------------------------------------------------
# A file (embedded stack; or a ConfigMap mirror)
# --------------------------------------------------------------------------------------------------


class FileTopologyStore:
    """The topology as one JSON document in a file, replaced atomically; `publish` holds an exclusive
    lock on `<file>.lock` around its compare-and-set. Only the version in force is kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"file {path}"

    def _read(self) -> Topology | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TopologyFileError(f"CRS_TOPOLOGY_FILE {self.path}: cannot read it: {exc.strerror}") from exc
        if not raw.strip():      # created empty ahead of the first publish: nothing published yet
            return None
        try:
            return Topology.from_document(orjson.loads(raw))
        except (orjson.JSONDecodeError, TopologyError) as exc:
            raise TopologyFileError(f"CRS_TOPOLOGY_FILE {self.path}: {exc}") from exc

    def check(self, *, must_exist: bool = False) -> None:
        """Before a command uses the file: its directory exists (a publish creates the file there) and
        the file, where there is one, parses. A node (`must_exist`) also needs the file itself: at a
        mistyped path it would run the ring of CRS_REDIS_SHARDS while the other nodes run the published
        topology, and its fills and deletes would go to other shards than theirs. TopologyFileError."""
        if not self.path.parent.is_dir():
            raise TopologyFileError(f"CRS_TOPOLOGY_FILE {self.path}: directory {self.path.parent} does not exist")
        if must_exist and not self.path.exists():
            raise TopologyFileError(f"CRS_TOPOLOGY_FILE {self.path} does not exist: correct the path, or create"
                                    " the file empty (nothing published yet: nodes run CRS_REDIS_SHARDS)")
        self._read()

    async def current(self) -> Topology | None:
        return await asyncio.to_thread(self._read)

    async def current_version(self) -> int:
        t = await self.current()
        return 0 if t is None else t.version

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _publish(self, topology: Topology, reason: str) -> None:
        with self._locked():
            now = self._read()
            version = 0 if now is None else now.version
            if topology.version != version + 1:
                raise TopologyConflict(f"cannot publish topology version {topology.version}:"
                                       f" version {version} is in force")
            doc = topology.to_document()
            if reason:
                doc["note"] = reason
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
            os.replace(tmp, self.path)

    async def publish(self, topology: Topology, *, reason: str) -> None:
        await asyncio.to_thread(self._publish, topology, reason)


# Serializes "a node reads the topology and registers its heartbeat" (shared) against "an operator
# publishes a version" (exclusive), so a node starting during a move is either seen at the version it
# read or reads the new one: the migrator can never miss a node two versions behind.
REGISTRATION_LOCK = 0x43525303


@contextlib.asynccontextmanager
async def registration(pool: asyncpg.Pool, *, exclusive: bool) -> AsyncIterator[Conn]:
    async with pool.acquire() as conn, conn.transaction():
        lock = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        await conn.execute(f"SELECT {lock}($1)", REGISTRATION_LOCK)
        yield conn


async def publish(store: TopologyStore, pool: asyncpg.Pool, topology: Topology, *, reason: str) -> None:
    """Publish through `store` while no node is between reading the topology and registering."""
    async with registration(pool, exclusive=True):
        await store.publish(topology, reason=reason)


def open_store(pool: asyncpg.Pool, topology_file: str) -> TopologyStore:
    """The file when CRS_TOPOLOGY_FILE is set, else PostgreSQL."""
    return FileTopologyStore(Path(topology_file)) if topology_file else PgTopologyStore(pool)


# --------------------------------------------------------------------------------------------------
# The staged change (PostgreSQL only)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    base_version: int
    shards: tuple[TopologyShard, ...]
    updated_at: dt.datetime | None = None
    updated_by: str = ""


async def load_draft(conn: Conn | asyncpg.Pool) -> Draft | None:
    row = await conn.fetchrow("SELECT base_version, shards, updated_at, updated_by FROM shard_topology_draft")
    if row is None:
        return None
    doc = {"version": 0, "shards": orjson.loads(row["shards"])}
    return Draft(row["base_version"], Topology.from_document(doc).shards, row["updated_at"], row["updated_by"])


async def save_draft(conn: Conn | asyncpg.Pool, draft: Draft) -> None:
    shards = Topology(version=0, shards=draft.shards).to_document()["shards"]
    await conn.execute(
        "INSERT INTO shard_topology_draft (id, base_version, shards) VALUES (true, $1, $2::jsonb)"
        " ON CONFLICT (id) DO UPDATE SET base_version = excluded.base_version, shards = excluded.shards,"
        " updated_at = clock_timestamp(), updated_by = current_user",
        draft.base_version, orjson.dumps(shards).decode())


async def clear_draft(conn: Conn | asyncpg.Pool) -> bool:
    return bool(await conn.fetchval("WITH d AS (DELETE FROM shard_topology_draft RETURNING 1) SELECT count(*) FROM d"))


# --------------------------------------------------------------------------------------------------
# Warmer / cleanup progress (PostgreSQL only)
# --------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    shard: str
    scan_cursor: int = 0
    scanned: int = 0
    moved: int = 0
    skipped: int = 0
    done: bool = False
    seconds: float = 0.0     # started_at .. updated_at


async def load_progress(conn: Conn | asyncpg.Pool, version: int, step: str) -> dict[str, Progress]:
    rows = await conn.fetch(
        "SELECT shard, scan_cursor, scanned, moved, skipped, done,"
        " extract(epoch FROM updated_at - started_at)::float8 AS seconds"
        " FROM shard_migration_progress WHERE topology_version = $1 AND step = $2", version, step)
    return {r["shard"]: Progress(r["shard"], int(r["scan_cursor"]), r["scanned"], r["moved"], r["skipped"], r["done"],
                                 r["seconds"]) for r in rows}


async def save_progress(conn: Conn | asyncpg.Pool, version: int, step: str, p: Progress) -> None:
    await conn.execute(
        "INSERT INTO shard_migration_progress (topology_version, step, shard, scan_cursor, scanned, moved, skipped,"
        " done) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (topology_version, step, shard) DO UPDATE SET scan_cursor = excluded.scan_cursor,"
        " scanned = excluded.scanned, moved = excluded.moved, skipped = excluded.skipped, done = excluded.done,"
        " updated_at = clock_timestamp()",
        version, step, p.shard, str(p.scan_cursor), p.scanned, p.moved, p.skipped, p.done)


# --------------------------------------------------------------------------------------------------
# Node heartbeats (PostgreSQL only)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeReport:
    node_id: str
    address: str
    topology_version: int
    phase: str
    ring: str
    shards_down: tuple[str, ...] = ()
    shard_errors: Mapping[str, int] | None = None
    age_s: float = 0.0           # seconds since its last heartbeat, by the database clock
    # The node's own settings a driver honours (migration 0015); None from an older node.
    lease_s: float | None = None
    reinvalidate_delay_s: float | None = None
    bootstrap_shards: str | None = None   # shard_router.topology.seed_text of its CRS_REDIS_SHARDS


async def heartbeat(conn: Conn | asyncpg.Pool, report: NodeReport) -> None:
    await conn.execute(
        "INSERT INTO node_status (node_id, address, topology_version, phase, ring, shards_down, shard_errors,"
        " lease_s, reinvalidate_delay_s, bootstrap_shards) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10)"
        " ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,"
        " topology_version = excluded.topology_version, phase = excluded.phase, ring = excluded.ring,"
        " shards_down = excluded.shards_down, shard_errors = excluded.shard_errors, lease_s = excluded.lease_s,"
        " reinvalidate_delay_s = excluded.reinvalidate_delay_s, bootstrap_shards = excluded.bootstrap_shards,"
        " seen_at = clock_timestamp()",
        report.node_id, report.address, report.topology_version, report.phase, report.ring,
        list(report.shards_down), orjson.dumps(dict(report.shard_errors or {})).decode(),
        report.lease_s, report.reinvalidate_delay_s, report.bootstrap_shards)


async def forget_node(conn: Conn | asyncpg.Pool, node_id: str) -> None:
    await conn.execute("DELETE FROM node_status WHERE node_id = $1", node_id)


async def prune_nodes(conn: Conn | asyncpg.Pool, older_than: float) -> None:
    await conn.execute("DELETE FROM node_status WHERE seen_at < clock_timestamp() - $1::interval",
                       dt.timedelta(seconds=older_than))


async def live_nodes(conn: Conn | asyncpg.Pool, within: float) -> list[NodeReport]:
    """Nodes whose last heartbeat (database clock) is younger than their own lease or `within`
    seconds, whichever is longer (a node heartbeats every third of its own lease), oldest version first."""
    rows = await conn.fetch(
        "SELECT node_id, address, topology_version, phase, ring, shards_down, shard_errors, lease_s,"
        " reinvalidate_delay_s, bootstrap_shards, extract(epoch FROM clock_timestamp() - seen_at)::float8 AS age"
        " FROM node_status"
        " WHERE seen_at >= clock_timestamp() - greatest(coalesce(lease_s, $1), $1) * interval '1 second'"
        " ORDER BY topology_version, node_id", float(within))
    return [_report(r) for r in rows]


def _report(r: asyncpg.Record) -> NodeReport:
    return NodeReport(r["node_id"], r["address"], r["topology_version"], r["phase"], r["ring"],
                      tuple(r["shards_down"]), orjson.loads(r["shard_errors"]), r["age"], r["lease_s"],
                      r["reinvalidate_delay_s"], r["bootstrap_shards"])


def lagging(nodes: Sequence[NodeReport], version: int) -> list[NodeReport]:
    return [n for n in nodes if n.topology_version < version]
