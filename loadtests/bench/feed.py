"""Change-feed latency and fan-out: commit -> delivery time with W watchers while writers commit at a
steady rate, and how many PostgreSQL connections the watchers cost.

    .venv/bin/python -m loadtests.bench.feed --watchers 100 --writes-per-s 100 --seconds 20

One node process (plaintext, anonymous) on the embedded stack. Writers call CreateCustomer from
threads at the given total rate; every watcher follows the whole feed on one grpc.aio channel in the
benchmark process. Latency of an event = the time a watcher received it - its `committed_at` (the
outbox row's clock_timestamp(), taken just before commit under the feed lock; same machine clock).
Prints p50/p99/max over every (watcher, event) pair, events lost (must be 0), and the node's
PostgreSQL connections by state: with LISTEN/NOTIFY the tailer holds one listening connection and
reads through the node's pool, whatever the number of watchers.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc

from devstack.environment import DevEnvironment
from loadtests.bench.report import percentile
from server import rpc
from server.proto import crs_pb2 as pb


class FeedWatchers:
    """Watch streams held open on nodes, each read to the end on a daemon thread (the benchmark's
    --watchers): with no writes running they receive only Progress marks, so what they cost a node is
    the feed machinery itself (tailer polls, queues, marks), not event volume."""

    def __init__(self, addresses: Sequence[str], *, per_node: int) -> None:
        self._channels = [grpc.insecure_channel(a) for a in addresses for _ in range(per_node)]
        self._calls = [rpc.stub(c, "ChangeFeedService").Watch(pb.WatchRequest()) for c in self._channels]
        self._threads = [threading.Thread(target=self._drain, args=(call,), daemon=True) for call in self._calls]
        for t in self._threads:
            t.start()

    @staticmethod
    def _drain(call: Any) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    def stop(self) -> None:
        for call in self._calls:
            call.cancel()
        for t in self._threads:
            t.join(5)
        for c in self._channels:
            c.close()


async def _watch(address: str, stop: asyncio.Event, latencies: list[float], seen: list[set[str]]) -> None:
    ids: set[str] = set()
    seen.append(ids)
    async with grpc.aio.insecure_channel(address) as channel:
        feed = rpc.stub(channel, "ChangeFeedService")
        call = feed.Watch(pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                read = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    break
                event = read.result()
                if event is grpc.aio.EOF:
                    break
                if event.entity_id:
                    latencies.append(time.time() - event.committed_at.ToMicroseconds() / 1e6)
                    ids.add(event.entity_id)
        finally:
            stopper.cancel()
            call.cancel()


def _writers(address: str, rate: float, seconds: float, threads: int, made: list[str]) -> None:
    lock = threading.Lock()
    interval = threads / rate
    deadline = time.monotonic() + seconds

    def loop() -> None:
        with grpc.insecure_channel(address) as channel:
            admin = rpc.stub(channel, "AdminService")
            next_at = time.monotonic()
            while next_at < deadline:
                reply = admin.CreateCustomer(pb.CreateCustomerRequest(display_name="Feed Bench"), timeout=10)
                with lock:
                    made.append(reply.customer_id)
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


async def _connections(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT coalesce(nullif(state, ''), 'unknown') AS state, count(*) FROM pg_stat_activity"
                                " WHERE usename = 'crs_node' GROUP BY 1")
        listening = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'crs_node'"
                                        " AND query ILIKE 'LISTEN%'")
        return {**{r["state"]: int(r["count"]) for r in rows}, "LISTEN": int(listening)}
    finally:
        await conn.close()


async def run(args: argparse.Namespace, address: str, admin_dsn: str) -> None:
    latencies: list[float] = []
    seen: list[set[str]] = []
    made: list[str] = []
    stop = asyncio.Event()
    watchers = [asyncio.create_task(_watch(address, stop, latencies, seen)) for _ in range(args.watchers)]
    await asyncio.sleep(2.0)                      # every watcher subscribed
    print(f"feed bench: {args.watchers} watchers connected; PostgreSQL connections of the node:"
          f" {await _connections(admin_dsn)}")
    await asyncio.to_thread(_writers, address, args.writes_per_s, args.seconds, args.writer_threads, made)
    during = await _connections(admin_dsn)
    await asyncio.sleep(2.0)                      # the last events arrive
    stop.set()
    await asyncio.gather(*watchers, return_exceptions=True)
    expected = set(made)
    lost = sum(len(expected - ids) for ids in seen)
    ms = [1000 * x for x in latencies]
    ordered = sorted(ms)
    print(f"feed bench: {len(made)} writes in {args.seconds:g}s ({len(made) / args.seconds:.0f}/s),"
          f" {len(ms)} deliveries to {args.watchers} watchers")
    print(f"  commit -> delivery ms: p50 {percentile(ordered, 50):.1f}  p99 {percentile(ordered, 99):.1f}"
          f"  max {max(ms, default=float('nan')):.1f}")
    print(f"  events lost: {lost}   node PostgreSQL connections while writing: {during}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.feed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watchers", type=int, default=100, help="concurrent Watch streams (default 100)")
    p.add_argument("--writes-per-s", type=float, default=100.0, help="CreateCustomer calls per second (default 100)")
    p.add_argument("--writer-threads", type=int, default=4, help="writer threads (default 4)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long writers write (default 20)")
    args = p.parse_args(argv)
    env = DevEnvironment(shards=2, customers=0)
    env.start()
    try:
        node = env.start_node(workers=1)
        asyncio.run(run(args, node.address, env.admin_dsn))
    finally:
        env.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
