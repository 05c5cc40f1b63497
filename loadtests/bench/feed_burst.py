"""Change-feed burst: watchers slower than a bulk import. How long each takes to receive every event,
whether any stream was ended (and resumed), and what the node's memory did meanwhile.

    .venv/bin/python -m loadtests.bench.feed_burst --events 50000 --watchers 10 --read-per-s 10000

One node process (plaintext, anonymous, default CRS_FEED_QUEUE_SIZE and CRS_FEED_BATCH unless given)
on the embedded stack. The watchers follow the customer events from the head; then one transaction
commits `--events` events (the way the envelope appends them, a 200-character name each: a bulk
import's worth of outbox rows at once). Each watcher reads at most `--read-per-s` events a second.
A stream that ends RESOURCE_EXHAUSTED or UNAVAILABLE is resumed from the last sequence received, as
`crs feed tail` does, and counted. Prints per-watcher time to the last event, the resumes, whether
each got every event once in order, and the node's resident memory before and at its peak (sampled
every 0.1 s from /proc, this process and its children).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import grpc

from devstack.environment import DevEnvironment
from server import rpc
from server.proto import crs_pb2 as pb
from server.store.feed import head

FEED_LOCK = 0x43525346   # server/store/envelope.py: sequences are drawn under it


async def _commit(dsn: str, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK)
            await conn.execute(
                "INSERT INTO outbox (seq, event_type, entity_type, entity_id, feed_type, feed_op, feed_id, state,"
                " settled_at) SELECT nextval('feed_seq'), 'customer.updated', 'customer', 'cus_burst' || i, $1, $2,"
                " 'cus_burst' || i, $3, now() FROM generate_series(1, $4) AS i",
                pb.ENTITY_TYPE_CUSTOMER, pb.OPERATION_UPDATE,
                pb.Customer(customer_id="cus_burst", display_name="x" * 200).SerializeToString(), n)
            await conn.execute("SELECT pg_notify('crs_feed', '')")
    finally:
        await conn.close()


def _rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its children (a node with workers), KiB."""
    total = 0
    for p in [pid, *(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


class Follower:
    def __init__(self, address: str, start: int, events: int, rate: float) -> None:
        self.address, self.cursor, self.events, self.rate = address, start, events, rate
        self.sequences: list[int] = []
        self.resumes: list[str] = []
        self.took = float("nan")

    async def run(self, began: asyncio.Event, t0: list[float]) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            feed = rpc.stub(channel, "ChangeFeedService")
            while len(self.sequences) < self.events:
                call = feed.Watch(pb.WatchRequest(from_sequence=self.cursor, entity_types=[pb.ENTITY_TYPE_CUSTOMER]))
                began.set()
                try:
                    async for event in call:
                        if event.WhichOneof("payload") == "progress" or not event.entity_id.startswith("cus_burst"):
                            continue
                        self.sequences.append(event.sequence)
                        self.cursor = event.sequence
                        if self.rate and len(self.sequences) % 100 == 0:
                            await asyncio.sleep(100 / self.rate)
                        if len(self.sequences) >= self.events:
                            self.took = time.monotonic() - t0[0]
                            break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                        raise
                    self.resumes.append(exc.code().name)
                    await asyncio.sleep(1.0)       # crs feed tail's first pause
                finally:
                    call.cancel()


async def run(args: argparse.Namespace, address: str, dsn: str, pid: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    start = await head(pool)
    await pool.close()
    t0 = [0.0]
    followers = [Follower(address, start, args.events, args.read_per_s) for _ in range(args.watchers)]
    began = [asyncio.Event() for _ in followers]
    tasks = [asyncio.create_task(f.run(b, t0)) for f, b in zip(followers, began, strict=True)]
    for b in began:
        await b.wait()
    await asyncio.sleep(1.0)                      # every watcher subscribed
    before = peak = _rss_kib(pid)
    t0[0] = time.monotonic()
    await _commit(dsn, args.events)
    committed = time.monotonic() - t0[0]
    while not all(t.done() for t in tasks):
        peak = max(peak, _rss_kib(pid))
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)
    exact = sum(f.sequences == sorted(set(f.sequences)) and len(f.sequences) == args.events for f in followers)
    took = sorted(f.took for f in followers)
    print(f"feed burst: {args.events} events committed in one transaction ({committed:.1f} s), {args.watchers}"
          f" watchers reading at most {args.read_per_s:g}/s each")
    print(f"  time to the last event: min {took[0]:.1f} s  max {took[-1]:.1f} s")
    print(f"  streams ended and resumed: {sum(len(f.resumes) for f in followers)}"
          f"  every event once, in order: {exact}/{args.watchers} watchers")
    print(f"  node memory (RSS): {before / 1024:.0f} MiB before, {peak / 1024:.0f} MiB at its peak")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.feed_burst", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=50_000, help="events in the burst (default 50000)")
    p.add_argument("--watchers", type=int, default=10, help="concurrent Watch streams (default 10)")
    p.add_argument("--read-per-s", type=float, default=10_000.0, help="each watcher's read rate cap, 0: none")
    p.add_argument("--queue-size", type=int, default=None, help="CRS_FEED_QUEUE_SIZE (default: the setting's)")
    args = p.parse_args(argv)
    env = DevEnvironment(shards=1, customers=0)
    env.start()
    try:
        overrides = {} if args.queue_size is None else {"feed_queue_size": args.queue_size}
        node = env.start_node(workers=1, **overrides)
        asyncio.run(run(args, node.address, env.admin_dsn, node.proc.pid))
    finally:
        env.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
