"""Key rotation, online: fingerprint keys (re-fingerprint every card and account) and the KEK.

Fingerprint rotation from version A to B (runbook: docs/security.md):
  1. configure key B on every node next to A (CRS_FINGERPRINT_KEYS="A:..,B:.."), current still A
     (CRS_FINGERPRINT_KEY_VERSION=A: with two keys it must be named); from then on new cards and
     accounts get a B fingerprint too;
  2. `crs keys rotate-fingerprint --to B` decrypts each stored number and writes its B fingerprint
     next to the A one (resumable: it only takes rows without one, in batches, with progress), and
     gives every identity source record its B blocking keys and national-id fingerprint; rows a write
     holds locked are taken after the pass, waiting for their locks; it is done only when none is left;
  3. switch nodes to CRS_FINGERPRINT_KEY_VERSION=B (a rolling restart); lookups by either version
     find every row throughout, and a node that misses under one version tries the others (and
     answers what it finds there uncached: a write invalidates only the versions the row carries);
  4. `crs keys retire-fingerprint --version A` promotes B to the primary columns (refusing while any
     row lacks a B fingerprint) and drops the A blocking keys, then A is removed from the configuration.
KEK rotation: configure the new KEK as CRS_KEK (+ version) and the old as CRS_KEK_PREVIOUS, run
`crs keys rotate-kek` (re-wraps every data key; card rows are not touched), then drop the old KEK.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

import asyncpg
import orjson

from server.crypto import ACCOUNT_PURPOSE, IDENTITY_PURPOSE, PAN_PURPOSE, DataKey, KeyConfigError, Keyring
from server.identity.attributes import Identity
from server.identity.blocking import block_hashes
from server.progress import ProgressBar
from server.store.db import CONNECT_TIMEOUT, verify_key_checks

BATCH = 1000
LOCK_WAIT = 30.0   # seconds the rotation waits, after its pass, for each table's rows a write held locked


@dataclass(frozen=True)
class TableSpec:
    table: str
    key: str
    ciphertext: str
    fingerprint: str
    next_fingerprint: str
    purpose: bytes


CARDS = TableSpec("cards", "token", "pan_ciphertext", "pan_fingerprint", "next_pan_fingerprint", PAN_PURPOSE)
ACCOUNTS = TableSpec("accounts", "account_id", "account_ciphertext", "account_fingerprint",
                     "next_account_fingerprint", ACCOUNT_PURPOSE)
_VERSIONED = ("cards", "accounts", "source_records")   # the tables whose rows carry fingerprint versions


async def _data_keys(conn: asyncpg.Connection, keyring: Keyring) -> dict[int, DataKey]:
    rows = await conn.fetch("SELECT dek_id, wrapped_key, kek_version FROM data_keys")
    return {r["dek_id"]: DataKey(r["dek_id"], keyring.unwrap(r["wrapped_key"], r["dek_id"], r["kek_version"]))
            for r in rows}


def _fingerprint_input(spec: TableSpec, clear: str, routing: str | None) -> str:
    return clear if spec is CARDS else f"{routing}:{clear}"


class RetireRefused(KeyConfigError):
    """retire-fingerprint found rows without a newer fingerprint: nothing was changed."""


async def rotate_fingerprint(dsn: str, keyring: Keyring, *, to_version: int, batch: int = BATCH,
                             lock_wait: float = LOCK_WAIT, out: TextIO | None = None,
                             ) -> tuple[dict[str, int], dict[str, int]]:
    """Give every card, account and identity record a `to_version` fingerprint.

    Returns (rows done, rows left) per table: a row is left only when a write held it locked for
    longer than `lock_wait` seconds; the rotation is done when every count left is 0."""
    if to_version not in keyring.fingerprint_keys:
        raise KeyConfigError(f"fingerprint key version {to_version} is not configured in CRS_FINGERPRINT_KEYS")
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    done: dict[str, int] = {}
    left: dict[str, int] = {}
    try:
        # Records `to_version`'s key check now, not at the first node's start: a node given another key
        # for it is then refused, instead of switching to a version whose fingerprints it cannot match.
        await verify_key_checks(conn, keyring)
        deks = await _data_keys(conn, keyring)
        for spec in (CARDS, ACCOUNTS):
            routing_col = "routing_number" if spec is ACCOUNTS else "NULL"

            async def numbers(rows: list[asyncpg.Record], spec: TableSpec = spec) -> None:
                updates = []
                for r in rows:
                    clear = deks[r["dek_id"]].decrypt(r["blob"], purpose=spec.purpose)
                    updates.append((r["id"], to_version,
                                    keyring.fingerprint(_fingerprint_input(spec, clear, r["routing"]), to_version)))
                await conn.executemany(f"UPDATE {spec.table} SET next_fingerprint_version = $2,"
                                       f" {spec.next_fingerprint} = $3 WHERE {spec.key} = $1", updates)

            done[spec.table], left[spec.table] = await _rotate_rows(
                conn, _Rows(spec.table, spec.key, f"{spec.ciphertext} AS blob, dek_id, {routing_col} AS routing",
                            spec.table, numbers), to_version, batch, lock_wait, out)
        key = keyring.fingerprint_keys[to_version]

        async def identities(rows: list[asyncpg.Record]) -> None:
            updates, blocks = [], []
            for r in rows:
                identity = Identity.from_dict(orjson.loads(deks[r["dek_id"]].open(r["blob"], purpose=IDENTITY_PURPOSE)))
                nid = identity.national_id_key
                updates.append((r["id"], to_version, keyring.fingerprint(nid, to_version) if nid else None))
                blocks += [(to_version, h, r["id"]) for h in block_hashes(key, identity)]
            await conn.executemany("UPDATE source_records SET next_fingerprint_version = $2, next_national_id_fp = $3"
                                   " WHERE record_id = $1", updates)
            await conn.executemany("INSERT INTO identity_blocks (version, block, record_id) VALUES ($1, $2, $3)"
                                   " ON CONFLICT DO NOTHING", blocks)

        done["source_records"], left["source_records"] = await _rotate_rows(
            conn, _Rows("source_records", "record_id", "attributes_ciphertext AS blob, dek_id", "identity records",
                        identities), to_version, batch, lock_wait, out)
    finally:
        await conn.close()
    return done, left


@dataclass(frozen=True)
class _Rows:
    """One table's rows to re-fingerprint: what to read of each (besides its key, as `id`) and how to
    write a batch of them (inside the transaction that locked them)."""
    table: str
    key: str
    columns: str
    label: str
    rewrite: Callable[[list[asyncpg.Record]], Awaitable[None]]
    # Which rows are to do: " FROM table WHERE (...)", $1 the version, one condition that a batch's
    # " AND key > $3" can follow (default: those without a fingerprint under the version yet).
    todo: str = ""
    doing: str = "re-fingerprinting"   # the progress bar's label


async def _rotate_rows(conn: asyncpg.Connection, rows: _Rows, to_version: int, batch: int, lock_wait: float,
                       out: TextIO | None) -> tuple[int, int]:
    """(rows done, rows left). One pass in batches over the rows no one holds (SKIP LOCKED: the pass
    never queues behind a write), then the rows it skipped again, one at a time, each waiting for its
    lock until `lock_wait` seconds after the pass: a row is left only if a write held it that long."""
    todo = rows.todo or (f" FROM {rows.table} WHERE fingerprint_version <> $1"
                         f" AND next_fingerprint_version IS DISTINCT FROM $1")
    select = f"SELECT {rows.key} AS id, {rows.columns}" + todo
    progress = ProgressBar(out or sys.stderr, f"{rows.doing} {rows.label}",
                           int(await conn.fetchval("SELECT count(*)" + todo, to_version)))
    done = 0
    # Each batch starts after the last key of the one before: from the first key, each read again (and
    # filtered out) every row the batches before had done, a rotation read n^2 / 2 / batch rows in all
    # (5 million cards, batch 1000: 2.5 million rows a batch by the middle, 1 s, 5,000 batches). A row
    # a write held (skipped) or one written behind the cursor is found by the second pass.
    after: str | int | None = None
    while True:
        async with conn.transaction():
            if after is None:
                batch_rows = await conn.fetch(select + f" ORDER BY {rows.key} LIMIT $2 FOR UPDATE SKIP LOCKED",
                                              to_version, batch)
            else:
                batch_rows = await conn.fetch(select + f" AND {rows.key} > $3 ORDER BY {rows.key} LIMIT $2"
                                              " FOR UPDATE SKIP LOCKED", to_version, batch, after)
            if not batch_rows:
                break
            await rows.rewrite(batch_rows)
        after = batch_rows[-1]["id"]
        done += len(batch_rows)
        progress.advance(len(batch_rows), rows.label)
    deadline = time.monotonic() + lock_wait
    while skipped := await conn.fetch(f"SELECT {rows.key} AS id" + todo + f" ORDER BY {rows.key} LIMIT $2",
                                      to_version, batch):
        for row in skipped:
            wait_ms = int((deadline - time.monotonic()) * 1000)
            if wait_ms < 1:   # 0 would be no limit
                progress.finish()
                return done, int(await conn.fetchval("SELECT count(*)" + todo, to_version))
            try:
                async with conn.transaction():   # holds no other lock while it waits: no deadlock
                    await conn.execute(f"SET LOCAL lock_timeout = {wait_ms}")
                    locked = await conn.fetch(select + f" AND {rows.key} = $2 FOR UPDATE", to_version, row["id"])
                    if locked:   # none: done (or gone) meanwhile
                        await rows.rewrite(locked)
            except asyncpg.exceptions.LockNotAvailableError:
                continue   # past the deadline: the next row counts what is left
            done += len(locked)
            progress.advance(len(locked), rows.label)
    progress.finish()
    return done, 0


# Each table's retire: the rows still refused (a row under the version without a newer fingerprint),
# and how a row's newer fingerprint becomes its primary one.
_RETIRE = (*((t.table, t.key, f"{t.next_fingerprint} IS NULL",
              f"{t.fingerprint} = {t.next_fingerprint}, {t.next_fingerprint} = NULL") for t in (CARDS, ACCOUNTS)),
           ("source_records", "record_id", "next_fingerprint_version IS NULL",
            "national_id_fp = next_national_id_fp, next_national_id_fp = NULL"))


async def retire_fingerprint(dsn: str, *, version: int, batch: int = BATCH, lock_wait: float = LOCK_WAIT,
                             out: TextIO | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Make the newer fingerprint of every row still primary under `version` its primary one, then mark
    the version retired and drop its blocking keys. Refuses, changing nothing, while any row has no
    newer fingerprint. Returns (rows moved, rows left) per table; a row is left only when a write held
    it locked past `lock_wait` (or a node still gave a new row only `version`'s): then nothing is marked
    retired, and a rerun takes the rows left.

    In batches, each its own transaction, the way rotate_fingerprint takes its rows: one statement over
    the table held every row it had changed locked until it ended, and a write to any card waited that
    long (1 million accounts: 20 s; 5 million cards: minutes, past every write's timeout). Each row's
    two columns move together, and lookups read both, so every row is found throughout."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    moved: dict[str, int] = {}
    left: dict[str, int] = {}
    try:
        await _known_version(conn, version)
        for table, _, refused, _ in _RETIRE:
            missing = int(await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE fingerprint_version = $1 AND {refused}", version))
            if missing:
                what = "identity records" if table == "source_records" else f"{table} rows"
                raise RetireRefused(f"{missing} {what} have no newer fingerprint yet: run"
                                    " `crs keys rotate-fingerprint --to NEW` first")
        for table, key, refused, promote in _RETIRE:
            async def rewrite(rows: list[asyncpg.Record], table: str = table, key: str = key,
                              promote: str = promote) -> None:
                await conn.execute(f"UPDATE {table} SET fingerprint_version = next_fingerprint_version, {promote},"
                                   f" next_fingerprint_version = NULL WHERE {key} = ANY($1)", [r["id"] for r in rows])

            # Rows under the version with a newer fingerprint, and rows whose newer one is their own.
            todo = (f" FROM {table} WHERE ((fingerprint_version = $1 AND NOT ({refused}))"
                    " OR next_fingerprint_version = fingerprint_version)")
            moved[table], _ = await _rotate_rows(conn, _Rows(table, key, "1", table, rewrite, todo, "retiring"),
                                                 version, batch, lock_wait, out)
            left[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE fingerprint_version = $1",
                                                  version))
        if not any(left.values()):
            # The version's blocking keys, a batch a statement too (5 million of them in one held every
            # identity record's update that replaces its keys), each after the last one's (from the start,
            # each would step over the index entries of every row deleted before it); then the mark: a run
            # cut short marks nothing.
            after: tuple[int, int] = (-2**63, -1)
            while done := await conn.fetch(
                    "DELETE FROM identity_blocks WHERE (version, block, record_id) IN (SELECT version, block,"
                    " record_id FROM identity_blocks WHERE version = $1 AND (block, record_id) > ($2, $3)"
                    " ORDER BY block, record_id LIMIT $4) RETURNING block, record_id", version, *after, batch):
                after = max((r["block"], r["record_id"]) for r in done)
            await conn.execute("UPDATE key_checks SET retired_at = now() WHERE kind = 'fingerprint' AND version = $1",
                               version)
    finally:
        await conn.close()
    return moved, left


async def _known_version(conn: asyncpg.Connection, version: int) -> None:
    """Refuse (bad usage) a version never configured here (no key check) that no row uses: nothing to retire."""
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM key_checks WHERE kind = 'fingerprint' AND version = $1)"
                           + "".join(f" OR EXISTS (SELECT 1 FROM {t} WHERE fingerprint_version = $1"
                                     " OR next_fingerprint_version = $1)" for t in _VERSIONED), version):
        return
    checks = {r["version"]: r["retired_at"] for r in await conn.fetch(
        "SELECT version, retired_at FROM key_checks WHERE kind = 'fingerprint'")}
    used = {r["v"] for r in await conn.fetch(" UNION ".join(
        f"SELECT fingerprint_version AS v FROM {t} UNION SELECT next_fingerprint_version FROM {t}"
        " WHERE next_fingerprint_version IS NOT NULL" for t in _VERSIONED))}
    known = ", ".join(f"{v}{' (retired)' if checks.get(v) else ''}" for v in sorted(set(checks) | used)) or "none"
    raise KeyConfigError(f"fingerprint key version {version} was never configured here and no row uses it: nothing"
                         f" to retire (fingerprint key versions here: {known})")


async def rotate_kek(dsn: str, keyring: Keyring) -> int:
    """Re-wrap every data key not yet under the current KEK. Returns how many were re-wrapped."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        async with conn.transaction():
            rows = await conn.fetch("SELECT dek_id, wrapped_key, kek_version FROM data_keys WHERE kek_version <> $1"
                                    " FOR UPDATE", keyring.kek_version)
            for r in rows:
                clear = keyring.unwrap(r["wrapped_key"], r["dek_id"], r["kek_version"])
                await conn.execute("UPDATE data_keys SET wrapped_key = $2, kek_version = $3 WHERE dek_id = $1",
                                   r["dek_id"], keyring.wrap(clear, r["dek_id"]), keyring.kek_version)
        return len(rows)
    finally:
        await conn.close()


async def key_status(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        lines = []
        for table, name, rows in ((CARDS.table, CARDS.table, "rows"), (ACCOUNTS.table, ACCOUNTS.table, "rows"),
                                  ("source_records", "identities", "records")):
            for r in await conn.fetch(f"SELECT fingerprint_version AS v, next_fingerprint_version AS nv, count(*) AS n"
                                      f" FROM {table} GROUP BY 1, 2 ORDER BY 1, 2"):
                nxt = f" (+ version {r['nv']})" if r["nv"] is not None else ""
                lines.append((name, f"{r['n']} {rows} fingerprinted with version {r['v']}{nxt}"))
        for r in await conn.fetch("SELECT kek_version, count(*) AS n FROM data_keys GROUP BY 1 ORDER BY 1"):
            lines.append(("data_keys", f"{r['n']} wrapped under KEK version {r['kek_version']}"))
        for r in await conn.fetch("SELECT version, retired_at FROM key_checks WHERE kind = 'fingerprint' ORDER BY 1"):
            lines.append(("key_checks", f"fingerprint version {r['version']}"
                                        + (f" retired {r['retired_at']:%Y-%m-%d %H:%M}" if r["retired_at"] else "")))
        return lines
    finally:
        await conn.close()
