"""The BIN table in PostgreSQL: versions, the atomic import, and what a node loads (docs/bins.md).

An import writes its rows as a new version and, in the same transaction, makes it the active one,
so a node never sees half a table; a file with more rejected rows than allowed never becomes a
version at all (a bad file never replaces a good table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server.bins import PREFIX_DIGITS, BinRow
from server.errors import NotFound
from server.store.db import Conn

_COLUMNS = ("version", "low", "high", "pan_length", "network", "issuer_name", "issuer_country", "product", "on_us")


@dataclass(frozen=True)
class TableInfo:
    version: int
    active: bool
    source_file: str
    sha256: str
    ranges: int
    rejected: int
    imported_at: datetime
    activated_at: datetime | None


async def active_version(conn: Conn | asyncpg.Pool) -> int:
    """The active version, 0 when no table was ever imported."""
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM bin_tables WHERE active"))


# The ranges as the 11-digit interval BinRow.start / BinRow.end, in C collation (digit strings of one
# length compare as numbers).
_START = "rpad(low, 11, '0') COLLATE \"C\""
_END = "rpad(high, 11, '9') COLLATE \"C\""
_SELECT = ("SELECT low, high, pan_length, network, issuer_name, issuer_country, product, on_us FROM bin_ranges"
           " WHERE version = $1")


def _rows(records: list[asyncpg.Record]) -> list[BinRow]:
    return [BinRow(r["low"], r["high"], r["pan_length"], r["network"], r["issuer_name"], r["issuer_country"],
                   r["product"], r["on_us"]) for r in records]


async def load_rows(conn: Conn, version: int) -> list[BinRow]:
    """Every range of `version`, in no particular order (BinTable's answers do not depend on it)."""
    return _rows(await conn.fetch(_SELECT, version))


async def covering_rows(conn: Conn, version: int, digits: str) -> list[BinRow]:
    """The ranges of `version` holding some card number that starts with `digits` (6 or more ASCII
    digits): a BinTable built from them answers `digits` (lookup, covering, touches) as one built from
    the whole table does, at 500k ranges in ~0.1 s instead of ~6."""
    low = digits[:PREFIX_DIGITS].ljust(PREFIX_DIGITS, "0")
    high = digits[:PREFIX_DIGITS].ljust(PREFIX_DIGITS, "9")
    return _rows(await conn.fetch(f"{_SELECT} AND {_START} <= $3 AND {_END} >= $2", version, low, high))


SHRINK_LIMIT = 0.5   # a new table under this fraction of the active one's ranges needs allow_shrink


class TableShrinks(Exception):
    """The new table has under SHRINK_LIMIT of the active table's ranges: most likely a truncated or
    partial file, which would leave most cards without a range (crs bins import --allow-shrink)."""

    def __init__(self, version: int, ranges: int) -> None:
        super().__init__(f"the active table, version {version}, has {ranges:,} ranges")
        self.version = version
        self.ranges = ranges


async def import_table(conn: Conn, rows: Sequence[BinRow], *, source_file: str, sha256: str, rejected: int,
                       allow_shrink: bool = True) -> int:
    """Store `rows` as a new version and activate it, atomically. Returns the version. Without
    `allow_shrink`, TableShrinks (nothing written) when `rows` are under SHRINK_LIMIT of the active
    table's ranges; checked under the import lock, so against the table it would replace."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE bin_tables IN SHARE ROW EXCLUSIVE MODE")   # one import at a time
        if not allow_shrink:
            active = await conn.fetchrow("SELECT version, ranges FROM bin_tables WHERE active")
            if active is not None and len(rows) < active["ranges"] * SHRINK_LIMIT:
                raise TableShrinks(int(active["version"]), int(active["ranges"]))
        version = int(await conn.fetchval("SELECT coalesce(max(version), 0) + 1 FROM bin_tables"))
        await conn.execute("INSERT INTO bin_tables (version, source_file, sha256, ranges, rejected)"
                           " VALUES ($1, $2, $3, $4, $5)", version, source_file, sha256, len(rows), rejected)
        await conn.copy_records_to_table(
            "bin_ranges", columns=_COLUMNS,
            records=[(version, r.low, r.high, r.pan_length, r.network, r.issuer_name, r.issuer_country, r.product,
                      r.on_us) for r in rows])
        await _activate(conn, version)
    return version


async def versions_in_use(conn: Conn | asyncpg.Pool, *, within: float) -> tuple[int, list[int]]:
    """(the active version, 0 when none; it and those that stopped being active less than `within`
    seconds ago): the versions card answers may still be cached under (server/cache_keys.py)."""
    rows = await conn.fetch("SELECT version, active FROM bin_tables WHERE active"
                            " OR deactivated_at > now() - make_interval(secs => $1)", within)
    active = next((int(r["version"]) for r in rows if r["active"]), 0)
    return active, sorted(int(r["version"]) for r in rows)


async def _activate(conn: Conn, version: int) -> None:
    await conn.execute("UPDATE bin_tables SET active = false, deactivated_at = now() WHERE active AND version <> $1",
                       version)
    status = await conn.execute("UPDATE bin_tables SET active = true, activated_at = now(), deactivated_at = NULL"
                                " WHERE version = $1", version)
    if status.endswith(" 0"):
        raise NotFound(f"BIN table version {version} does not exist")


async def activate(conn: Conn, version: int) -> None:
    """Make an older (or newer) stored version the active one: the rollback of a bad table."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE bin_tables IN SHARE ROW EXCLUSIVE MODE")
        await _activate(conn, version)


async def versions(conn: Conn) -> list[TableInfo]:
    rows = await conn.fetch("SELECT * FROM bin_tables ORDER BY version DESC")
    return [TableInfo(r["version"], r["active"], r["source_file"], r["sha256"], r["ranges"], r["rejected"],
                      r["imported_at"], r["activated_at"]) for r in rows]
