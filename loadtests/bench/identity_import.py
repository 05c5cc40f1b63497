"""`crs-load identity-import`: `crs import customers` rows/s into a preloaded database, repeatable, so
two versions of the code can be measured back to back on the same data (docs/identity.md
"Performance"). `identity-bench` preloads, measures and throws the database away in one go; at 1M
customers a preload takes many minutes, too long to repeat per measurement.

    crs-load identity-import prep --customers 1000000 --dir D    # preload once (identity-bench's people)
    crs-load identity-import file --rows 50000 --dir D           # the import file (10% known people)
    crs-load identity-import run --dir D [--profile OUT.prof]    # copy D's data, import, report, delete

`run` starts PostgreSQL on a copy of the preloaded data directory (migrations of the code under
test applied), runs the real import path (`import_customers`: parsing, validation, identification,
COPY, feed rows) and prints rows/s with the CPU seconds it took: of this process, of the import's
reader process and of PostgreSQL (postmaster and its children). On a shared machine wall-clock
figures move with the neighbours' load; the CPU seconds per row move much less. Run it from a
checkout of the version to measure (`cd OTHER && python -m loadtests.bench.identity_import run ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_SETTINGS = {"CRS_ALLOW_PLAINTEXT": "true", "CRS_ALLOW_ANONYMOUS": "true"}


def _settings(dsn: str, keys: dict[str, str]) -> Any:
    from server.settings import load_settings

    return load_settings(dict(keys) | _SETTINGS | {"CRS_PG_DSN": dsn})


def postgres_cpu_seconds(pid: int) -> float:
    """CPU seconds of a postmaster, its children that ended and its children alive (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(p: str | int) -> list[str]:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

    total = sum(int(x) for x in stat(pid)[11:15]) / tick       # utime stime cutime cstime
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = stat(p)
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def prep(base: Path, customers: int, batch: int) -> None:
    import asyncpg

    from devstack.environment import prepare_database
    from devstack.postgres import PostgresServer
    from loadtests.bench.identity import _preload
    from server.crypto import generate_keys

    base.mkdir(parents=True, exist_ok=True)
    keys = generate_keys()
    (base / "keys.json").write_text(json.dumps(keys))       # throwaway dev keys of throwaway data
    pg = PostgresServer(data_dir=base / "pg", log_path=base / "pg.log")
    pg.start()
    try:
        async def create() -> None:
            conn = await asyncpg.connect(pg.dsn())
            await conn.execute("CREATE DATABASE crs")
            await conn.close()

        asyncio.run(create())
        settings = _settings(pg.dsn("crs"), keys)
        asyncio.run(prepare_database(settings, customers=0))
        rate = asyncio.run(_preload(pg.dsn("crs"), settings, 0, customers, batch))
        (base / "preloaded.json").write_text(json.dumps({"customers": customers}))
        print(f"preloaded {customers:,} customers at {rate:,.0f} rows/s into {base}")
    finally:
        pg.stop()


def _postgres(data_dir: Path, settings: dict[str, str]) -> Any:
    """The dev stack's PostgreSQL server with `settings` over its own (a later -c wins)."""
    from devstack.postgres import PostgresServer

    class Tuned(PostgresServer):
        def _server_argv(self) -> list[str]:
            return [*super()._server_argv(), *(a for k, v in settings.items() for a in ("-c", f"{k}={v}"))]

    return Tuned(data_dir=data_dir, log_path=data_dir.with_name(data_dir.name + ".log"))


async def _show(dsn: str, names: list[str]) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return {n: str(await conn.fetchval("SELECT current_setting($1)", n)) for n in names}
    finally:
        await conn.close()


_PREWARM = ("identity_blocks_pkey", "source_records_pkey", "customers_pkey")


async def _prewarm(dsn: str) -> dict[str, int]:
    """Load the candidate search's indexes into shared buffers, as a database in service holds
    them: a fresh server reads them from the OS cache on the first batches instead (pg_prewarm)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        return {name: int(await conn.fetchval("SELECT pg_prewarm($1::regclass)", name)) for name in _PREWARM}
    finally:
        await conn.close()


def run(base: Path, file: Path, batch: int, profile: str | None, pg_settings: dict[str, str],
        prewarm: bool = False) -> dict[str, Any]:
    from server.cli.imports import import_customers
    from server.store.migrate import migrate

    keys = json.loads((base / "keys.json").read_text())
    work = base.with_name(base.name + "-run")
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["cp", "-a", str(base / "pg"), str(work)], check=True)
    pg = _postgres(work, pg_settings)
    pg.start()
    try:
        assert pg.pid is not None
        asyncio.run(migrate(pg.dsn("crs")))
        in_force = asyncio.run(_show(pg.dsn("crs"), list(pg_settings)))
        warmed = asyncio.run(_prewarm(pg.dsn("crs"))) if prewarm else {}
        settings = _settings(pg.dsn("crs"), keys)
        report = work.with_name(work.name + "-report.csv")
        profiler = cProfile.Profile() if profile else None
        pg0, children0 = postgres_cpu_seconds(pg.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0, cpu0 = time.monotonic(), time.process_time()
        if profiler:
            profiler.enable()
        with open(os.devnull, "w") as quiet:
            summary = asyncio.run(import_customers(settings, file, "bench-import", report, None, batch, out=quiet))
        if profiler and profile:
            profiler.disable()
            profiler.dump_stats(profile)
        elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        time.sleep(0.5)                         # the pool's backends exit and are counted
        result = {"rows": summary.read, "seconds": round(elapsed, 2), "rows_per_s": round(summary.read / elapsed),
                  "cpu_s": {"import": round(cpu, 2),
                            "reader": round(children.ru_utime + children.ru_stime
                                            - children0.ru_utime - children0.ru_stime, 2),
                            "postgres": round(postgres_cpu_seconds(pg.pid) - pg0, 2)},
                  "load_average": round(os.getloadavg()[0], 2), "decisions": dict(summary.decisions),
                  "postgres_settings": in_force, "prewarmed_blocks": warmed}
        shutil.copy(report, base / "last-report.csv")
        return result
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
        for leftover in (work.with_name(work.name + ".log"), work.with_name(work.name + "-report.csv")):
            leftover.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crs-load identity-import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("prep", "file", "run"))
    p.add_argument("--dir", required=True, type=Path, help="where the preloaded data and the import file live")
    p.add_argument("--customers", type=int, default=100_000, help="prep: people to preload")
    p.add_argument("--rows", type=int, default=50_000, help="file: rows of the import file")
    p.add_argument("--dup-rate", type=float, default=0.1, help="file: share of rows that are preloaded people")
    p.add_argument("--batch", type=int, default=2000, help="rows per transaction (prep and run)")
    p.add_argument("--profile", help="run: write a cProfile of the importing process here")
    p.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="run: a PostgreSQL server setting over the dev stack's (e.g. shared_buffers=1GB)")
    p.add_argument("--prewarm", action="store_true",
                   help="run: load the search's indexes into shared buffers first (pg_prewarm: PostgreSQL's"
                        " contrib; give shared_buffers room for them)")
    args = p.parse_args(argv)
    from server.logs import configure_logging

    configure_logging("WARNING")
    base: Path = args.dir.resolve()
    if args.step == "prep":
        prep(base, args.customers, args.batch)
    elif args.step == "file":
        from loadtests.bench.identity import _write_import_file

        loaded = json.loads((base / "preloaded.json").read_text())["customers"] \
            if (base / "preloaded.json").exists() else args.customers
        dups = _write_import_file(base / "import.csv", args.rows, loaded, args.dup_rate)
        print(f"{base / 'import.csv'}: {args.rows:,} rows, {dups:,} of them another record of a preloaded person")
    else:
        pg_settings = dict(s.split("=", 1) for s in args.pg_setting)
        print(json.dumps(run(base, base / "import.csv", args.batch, args.profile, pg_settings, args.prewarm)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
