"""Time shard_router.Ring: ns/key for node_for and for group_by_node over 1,000-key batches.

Run from the repository root:  .venv/bin/python -m scripts.bench_ring [--shards 10] [--keys 100000]
Plain timeit, best of --repeat runs (no pytest-benchmark needed). The target is < 2 us/key for
node_for; --max-node-for-ns N exits 1 above N ns/key (a regression gate for a quiet machine: the
test suite asserts no timings).
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
import timeit

from shard_router import Ring, ShardSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-node-for-ns", type=float, default=None, help="exit 1 if node_for(str) is slower")
    args = ap.parse_args()

    rng = random.Random(1)
    keys_str = [f"card:{rng.randrange(10**15, 10**16)}" for _ in range(args.keys)]
    keys_bytes = [k.encode() for k in keys_str]
    batches = [keys_str[i : i + args.batch] for i in range(0, len(keys_str), args.batch)]

    t0 = time.perf_counter()
    ring = Ring(ShardSpec(f"shard-{i}") for i in range(args.shards))
    build_ms = (time.perf_counter() - t0) * 1e3

    def per_key(fn: object, n: int) -> float:
        best = min(timeit.repeat(fn, number=1, repeat=args.repeat))  # type: ignore[arg-type]
        return best / n * 1e9

    node_for = ring.node_for

    def loop_str() -> None:
        for k in keys_str:
            node_for(k)

    def loop_bytes() -> None:
        for k in keys_bytes:
            node_for(k)

    def grouped() -> None:
        for batch in batches:
            ring.group_by_node(batch)

    def bare_loop() -> None:
        for _k in keys_str:
            pass

    print(f"python {platform.python_version()} on {platform.machine()}; {args.shards} shards, {args.keys} keys")
    print(f"Ring() build: {build_ms:.2f} ms")
    node_for_ns = per_key(loop_str, len(keys_str))
    print(f"node_for(str):   {node_for_ns:7.0f} ns/key")
    print(f"node_for(bytes): {per_key(loop_bytes, len(keys_bytes)):7.0f} ns/key")
    print(f"group_by_node({args.batch} keys): {per_key(grouped, len(keys_str)):7.0f} ns/key")
    print(f"(empty for-loop: {per_key(bare_loop, len(keys_str)):.0f} ns/key)")
    if args.max_node_for_ns is not None and node_for_ns > args.max_node_for_ns:
        sys.exit(f"node_for(str) takes {node_for_ns:.0f} ns/key, over --max-node-for-ns {args.max_node_for_ns:.0f}")


if __name__ == "__main__":
    main()
