"""What the feed lock costs writers: commits per second of an outbox-like write with and without the
transaction-level advisory lock the feed sequence is drawn under, on a *durable* PostgreSQL
(fsync and synchronous_commit on, unlike the dev stack), at several writer concurrencies.

    .venv/bin/python -m loadtests.bench.feed_lock --seconds 5 --writers 1,4,16

Each write is one transaction: an UPDATE of a row of its own, then (locked variant) the advisory
lock, then the outbox INSERT with nextval, then COMMIT. Without the lock, group commit lets
concurrent commits share one WAL flush; with it, commits queue behind each other's flush. The ratio
is the figure docs/decisions.md ("Change feed") refers to. Absolute numbers depend on the disk.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from devstack.postgres import PostgresServer

LOCK = 0x43525346   # the feed lock's id (server/store/envelope.py FEED_LOCK)
SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
CREATE SEQUENCE seq;
CREATE TABLE box (id bigserial PRIMARY KEY, seq bigint, at timestamptz DEFAULT clock_timestamp(), body bytea);
INSERT INTO item SELECT g FROM generate_series(1, 1000) g;
"""


async def _writer(dsn: str, me: int, locked: bool, until: float, done: list[int]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        body = b"x" * 200
        while time.monotonic() < until:
            async with conn.transaction():
                await conn.execute("UPDATE item SET n = n + 1 WHERE id = $1", me)
                if locked:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
                await conn.execute("INSERT INTO box (seq, body) VALUES (nextval('seq'), $1)", body)
            done[me] += 1
    finally:
        await conn.close()


async def _round(dsn: str, writers: int, locked: bool, seconds: float) -> float:
    done = [0] * (writers + 1)
    until = time.monotonic() + seconds
    await asyncio.gather(*(_writer(dsn, i + 1, locked, until, done) for i in range(writers)))
    return sum(done) / seconds


async def _run(dsn: str, concurrencies: Sequence[int], seconds: float) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    print(f"{'writers':>8} {'no lock /s':>12} {'feed lock /s':>13} {'ratio':>7}")
    for n in concurrencies:
        free = await _round(dsn, n, False, seconds)
        locked = await _round(dsn, n, True, seconds)
        print(f"{n:>8} {free:>12,.0f} {locked:>13,.0f} {locked / free:>7.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.feed_lock", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    p.add_argument("--writers", default="1,4,16", help="writer concurrencies (default 1,4,16)")
    args = p.parse_args(argv)
    concurrencies = [int(x) for x in args.writers.split(",") if x.strip()]
    with tempfile.TemporaryDirectory(prefix="crs-feedlock-") as tmp:
        Path(tmp).chmod(0o755)   # PostgreSQL may run as another user when we are root
        server = PostgresServer(data_dir=Path(tmp) / "pg", fast_unsafe=False)
        server.start()
        try:
            asyncio.run(_run(server.dsn(), concurrencies, args.seconds))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
