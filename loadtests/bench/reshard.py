"""How fast the resharding warmer and cleanup go: grow 3 -> 4 shards holding N synthetic cached values,
through the real `crs shards` commands, and report plan/copy/cleanup times and keys per second.

    .venv/bin/python -m loadtests.bench.reshard --keys 300000 --value-bytes 300 --rate 1000000

No node runs (nothing else competes for the CPU), so this is the warmer's own ceiling on this machine;
under lookup load the pacing (--rate, CRS_MIGRATION_RATE) is what keeps it polite. docs/runbooks/
resharding.md quotes the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import redis

from devstack.environment import DevEnvironment
from server.settings import settings_to_env
from shard_router import Ring, ShardSpec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=300_000, help="cached values before the move (default 300000)")
    p.add_argument("--value-bytes", type=int, default=300, help="bytes per value (default 300)")
    p.add_argument("--rate", type=int, default=1_000_000, help="crs shards apply --rate (default 1000000)")
    args = p.parse_args()

    env = DevEnvironment(shards=4, customers=0)
    env.start()
    try:
        assert env.stack is not None
        settings = env.settings()
        boot = settings.redis_shards[:3]
        settings = replace(settings, redis_shards=boot, pg_dsn=env.admin_dsn)
        ring = Ring(ShardSpec(s.name) for s in boot)
        clients = {s.name: redis.Redis.from_url(s.url) for s in boot}
        pipes = {name: c.pipeline(transaction=False) for name, c in clients.items()}
        value = os.urandom(args.value_bytes)
        started = time.monotonic()
        for i in range(args.keys):
            key = f"crd:1:{i:064x}"
            pipes[ring.node_for(key)].set(key, value, px=3_600_000)
            if i % 5000 == 4999:
                for pipe in pipes.values():
                    pipe.execute()
        for pipe in pipes.values():
            pipe.execute()
        print(f"loaded {args.keys:,} keys of {args.value_bytes} bytes in {time.monotonic() - started:.1f}s")

        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | settings_to_env(settings)

        def crs(*a: str) -> tuple[float, str]:
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "server.cli", "shards", *a], env=cli_env, text=True,
                               capture_output=True, check=True)
            return time.monotonic() - t0, r.stdout

        shard3 = env.stack.redis[3]
        crs("add", "shard-3", "--address", shard3.url)
        seconds, out = crs("plan", "--sample", "0")
        print(f"plan (every key, SCAN + MEMORY USAGE): {seconds:.1f}s")
        print(out)
        seconds, out = crs("apply", "--rate", str(args.rate))
        print(out)
        print(f"apply, end to end: {seconds:.1f}s")
        for step in ("copy", "cleanup"):
            m = re.search(rf"  {step}: ([\d,]+) keys examined, ([\d,]+) \w+.* in ([\d.]+)s", out)
            if m:
                examined, moved, secs = int(m[1].replace(",", "")), int(m[2].replace(",", "")), float(m[3])
                print(f"{step}: {moved:,} of {examined:,} keys in {secs:.1f}s ="
                      f" {examined / max(secs, 1e-9):,.0f} keys examined/s, {moved / max(secs, 1e-9):,.0f} moved/s")
        four = Ring(ShardSpec(f"shard-{i}") for i in range(4))
        left = sum(1 for name, c in ((r.name, redis.Redis.from_url(r.url)) for r in env.stack.redis)
                   for key in c.scan_iter(count=1000) if four.node_for(key) != name)
        print(f"keys on a shard that does not own them afterwards: {left}")
    finally:
        env.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
