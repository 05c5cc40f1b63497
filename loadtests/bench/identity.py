"""`crs-load identity-bench`: bulk import throughput with identification, and IdentifyCustomer latency,
on a throwaway local stack (PostgreSQL, one Redis shard, one node). docs/identity.md "Performance".

1. preload --customers synthetic people through the bulk path (server/store/bulk.py, batches of
   --batch, identification included; identities made in memory, no CSV), reporting rows/s;
   at each --checkpoints size, IdentifyCustomer p50/p99 through gRPC (--queries sequential calls:
   half existing people with a typo, half unknown people);
2. write --import-rows rows as a CSV (--dup-rate of them another record of a preloaded person) and
   run the real `crs import customers` path on it (parse, validate, identify, write), reporting rows/s.

People are generated from syllables at run time (no real-looking data), deterministically per index,
so a duplicate of person i is made by regenerating person i.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

_SYL = ("ka", "lo", "mi", "ra", "ten", "bel", "dor", "sa", "vin", "ma", "ro", "li", "an", "ber", "cus", "del",
        "fi", "gan", "ho", "jun", "ker", "lan", "mor", "nel", "pa", "quin", "sto", "tur", "val", "wen")
_STREETS = ("main", "oak", "pine", "maple", "cedar", "elm", "lake", "hill", "park", "river", "view", "mill")
_AREAS = (212, 312, 415, 617, 206, 303, 512, 404, 305, 702)


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts))


def person(i: int, seed: int = 7) -> dict[str, str]:
    """Person i (raw, as a source file would hold it)."""
    rng = random.Random(seed * 10_000_019 + i)
    born = date(1930 + rng.randrange(75), 1 + rng.randrange(12), 1 + rng.randrange(28))
    given, family = _name(rng, 2), _name(rng, 3)
    ssn = f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}" \
        if rng.random() < 0.6 else ""
    return {"given_name": given.title(), "family_name": family.title(), "date_of_birth": born.isoformat(),
            "national_id": ssn, "national_id_type": "US_SSN" if ssn else "",
            "address_line1": f"{rng.randint(1, 9999)} {rng.choice(_STREETS).title()} Street", "address_line2": "",
            "locality": _name(rng, 2).title(), "postcode": f"{rng.randrange(1000, 99999):05d}", "region": "",
            "country": "US",
            "phone": f"+1{rng.choice(_AREAS)}{rng.randint(2, 9)}{rng.randint(0, 999999):06d}"
            if rng.random() < 0.5 else "",
            "email": f"{given}.{family}{rng.randint(1, 99)}@example.com" if rng.random() < 0.4 else ""}


def variant(raw: dict[str, str], rng: random.Random) -> dict[str, str]:
    """Another source record of the same person: a typo, a lost email, a reformatted phone."""
    v = dict(raw)
    f = v["family_name"]
    i = rng.randrange(1, len(f) - 1)
    v["family_name"] = f[:i] + f[i + 1] + f[i] + f[i + 2:]
    v["email"] = ""
    return v


def identity_of(raw: dict[str, str]) -> Any:
    from server.identity.attributes import parse_identity

    return parse_identity(raw, strict=False)[0]


async def _preload(dsn: str, settings: Any, start: int, stop: int, batch: int) -> float:
    import asyncpg

    from server.identity.model import MatchModel, Thresholds
    from server.store.bulk import BulkCustomers, ImportRow
    from server.store.db import active_data_key
    from server.store.identity import IdentityCodec

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        keyring = settings.keyring()
        bulk = BulkCustomers(pool=pool, codec=IdentityCodec(keyring=keyring, data_key=await active_data_key(
            pool, keyring)), model=MatchModel.load(), thresholds=Thresholds(), system="bench-preload")
        t0 = time.monotonic()
        for lo in range(start, stop, batch):
            rows = [ImportRow(i + 2, f"P{i}", identity_of(person(i))) for i in range(lo, min(lo + batch, stop))]
            await bulk.write_batch(rows, "bench-preload", lo + len(rows))
            done = lo + len(rows) - start
            if done % (batch * 10) == 0 or lo + batch >= stop:
                rate = done / (time.monotonic() - t0)
                print(f"  preload {lo + len(rows):,}/{stop:,}  {rate:,.0f} rows/s", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - t0
        async with pool.acquire() as conn:
            await conn.execute("ANALYZE source_records; ANALYZE identity_blocks; ANALYZE customers")
        return (stop - start) / elapsed
    finally:
        await pool.close()


def _identify_latency(node: Any, loaded: int, queries: int) -> dict[str, float]:
    from server import rpc
    from server.proto import crs_pb2 as pb

    rng = random.Random(11)
    with node.channel("admin") as channel:
        stub = rpc.stub(channel, "IdentityService")
        times = []
        for q in range(queries):
            raw = variant(person(rng.randrange(loaded)), rng) if q % 2 else person(50_000_000 + q)
            attrs = pb.IdentityAttributes(
                given_name=raw["given_name"], family_name=raw["family_name"], date_of_birth=raw["date_of_birth"],
                national_id=raw["national_id"], national_id_type=raw["national_id_type"], phone=raw["phone"],
                email=raw["email"], address=pb.PostalAddress(line1=raw["address_line1"], postcode=raw["postcode"],
                                                             country="US"))
            t0 = time.perf_counter()
            stub.IdentifyCustomer(pb.IdentifyCustomerRequest(attributes=attrs), timeout=10)
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p99_ms": round(times[int(len(times) * 0.99) - 1], 2),
            "max_ms": round(times[-1], 2), "queries": queries}


def _write_import_file(path: Path, rows: int, loaded: int, dup_rate: float) -> int:
    from server.cli.import_files import CUSTOMER_COLUMNS

    rng = random.Random(5)
    dups = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CUSTOMER_COLUMNS)
        for n in range(rows):
            if rng.random() < dup_rate:
                raw, dups = variant(person(rng.randrange(loaded)), rng), dups + 1
            else:
                raw = person(20_000_000 + n)
            w.writerow([f"I{n}" if c == "source_ref" else raw[c] for c in CUSTOMER_COLUMNS])
    return dups


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crs-load identity-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=1_000_000, help="people to preload (default 1000000)")
    p.add_argument("--checkpoints", default="100000,1000000", help="sizes to measure IdentifyCustomer at")
    p.add_argument("--queries", type=int, default=1000, help="IdentifyCustomer calls per checkpoint")
    p.add_argument("--import-rows", type=int, default=50_000, help="rows of the measured import")
    p.add_argument("--dup-rate", type=float, default=0.1, help="share of import rows that are known people")
    p.add_argument("--batch", type=int, default=2000, help="rows per transaction")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)

    from devstack.environment import DevEnvironment
    from server.cli.imports import import_customers
    from server.logs import configure_logging

    configure_logging("WARNING")
    checkpoints = sorted({min(int(c), args.customers) for c in args.checkpoints.split(",") if c})
    results: dict[str, Any] = {"customers": args.customers, "batch": args.batch, "identify": {}}
    env = DevEnvironment(shards=1, customers=10)
    try:
        settings = env.start(out=open("/dev/null", "w"))
        node = env.start_node(workers=1)
        owner = env.settings()
        loaded, rates = 0, []
        for size in checkpoints:
            print(f"identity-bench: preloading to {size:,} customers ...", file=sys.stderr, flush=True)
            rate = asyncio.run(_preload(env.admin_dsn, owner, loaded, size, args.batch))
            rates.append((size - loaded, rate))
            loaded = size
            results["identify"][str(size)] = lat = _identify_latency(node, loaded, args.queries)
            print(f"identity-bench: IdentifyCustomer at {size:,}: {lat}", file=sys.stderr, flush=True)
        total = sum(n for n, _ in rates)
        results["preload_rows_per_s"] = round(total / sum(n / r for n, r in rates))
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "import.csv"
            results["import_duplicates"] = _write_import_file(file, args.import_rows, loaded, args.dup_rate)
            t0 = time.monotonic()
            summary = asyncio.run(import_customers(owner, file, "bench-import", Path(tmp) / "report.csv", None,
                                                   args.batch, out=open("/dev/null", "w")))
            elapsed = time.monotonic() - t0
        results["import"] = {"rows": summary.read, "seconds": round(elapsed, 1),
                             "rows_per_s": round(summary.read / elapsed), "decisions": dict(summary.decisions)}
        del settings
    finally:
        env.stop()
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
