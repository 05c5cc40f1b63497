"""Ordered, idempotent schema migrations recorded in `schema_versions`.

Files are `migrations/NNNN_name.sql`, applied in number order, each in its own transaction, under
an advisory lock so several nodes starting at once apply each migration exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from server.store.db import CONNECT_TIMEOUT, Conn

_LOCK_ID = 0x435253  # "CRS"
_NAME_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files("server.store").joinpath("migrations").iterdir():
        m = _NAME_RE.fullmatch(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers in {versions}")
    return found


async def applied_versions(conn: Conn) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_versions') IS NOT NULL")
    if not exists:
        return set()
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_versions")}


async def migrate(dsn: str) -> list[Migration]:
    """Apply every pending migration; return the ones applied now (empty when up to date)."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    applied_now: list[Migration] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await applied_versions(conn)
            for mig in available_migrations():
                if mig.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(mig.sql)
                    await conn.execute(
                        "INSERT INTO schema_versions (version, name) VALUES ($1, $2)", mig.version, mig.name
                    )
                applied_now.append(mig)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
    return applied_now


async def check_schema(conn: Conn) -> None:
    """Raise with a clear message if the database is not fully migrated (checked at node start)."""
    missing = {m.version for m in available_migrations()} - await applied_versions(conn)
    if missing:
        raise RuntimeError(
            f"database schema is not up to date (missing migrations {sorted(missing)}): run `crs migrate`")
