"""What streams whose client stopped reading cost a node, and what a Snapshot costs one that reads.

    .venv/bin/python -m loadtests.bench.stalled_streams --streams 40 --model hybrid

One node process (plaintext, anonymous) on the embedded stack with --customers demo customers. It
prints the node's resident memory (the process tree's RSS) at rest and with --streams StreamResolve
streams opened on one channel with gRPC's default client options (HTTP/2 BDP probing on, as most
clients have it), each sending near-cache keys for as long as the node takes them, reading --read
answers at full speed and then none (what a client that hangs mid-stream does); before that, the time
of --snapshots whole Snapshots read one after the other by a client that reads (best, median), the
Snapshot throughput a change to the node's HTTP/2 settings must not lower. Run it before and after
such a change, on the same machine.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Iterator, Sequence

import grpc
import psutil

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment, NodeProcess
from server import rpc
from server.proto import crs_pb2 as pb


def rss_mb(node: NodeProcess) -> float:
    root = psutil.Process(node.proc.pid)
    return float(sum(p.memory_info().rss for p in (root, *root.children(recursive=True)))) / 2**20


def stall(address: str, streams: int, read: int) -> tuple[grpc.Channel, list[grpc.Future]]:
    def requests() -> Iterator[pb.LookupKey]:
        for i in itertools.count():
            yield pb.LookupKey(pan=demo_pan(i % 50), correlation_id=str(i))

    channel = grpc.insecure_channel(address)
    lookup = rpc.stub(channel, "LookupService")
    calls = []
    for _ in range(streams):
        call = lookup.StreamResolve(requests(), timeout=600)
        answers = iter(call)
        for _ in range(read):   # at full speed: HTTP/2 BDP probing grows the windows
            next(answers)
        calls.append(call)
    return channel, calls


def snapshot_seconds(address: str, rounds: int) -> tuple[list[float], int]:
    times, entities = [], 0
    with grpc.insecure_channel(address) as channel:
        feed = rpc.stub(channel, "ChangeFeedService")
        for _ in range(rounds):
            started = time.perf_counter()
            chunks = list(feed.Snapshot(pb.SnapshotRequest(), timeout=120))
            times.append(time.perf_counter() - started)
            entities = sum(len(c.customers) + len(c.accounts) + len(c.cards) + len(c.relationships) for c in chunks)
    return times, entities


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.stalled_streams", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("hybrid", "aio"), default="hybrid", help="CRS_SERVING_MODEL (default hybrid)")
    p.add_argument("--streams", type=int, default=40, help="StreamResolve streams left unread (default 40)")
    p.add_argument("--read", type=int, default=5_000,
                   help="answers each stalled stream reads at full speed before it stops reading (default 5000);"
                        " it sends keys on, for as long as the node takes them")
    p.add_argument("--settle", type=float, default=8.0, help="seconds to let the stalled streams fill (default 8)")
    p.add_argument("--customers", type=int, default=20_000, help="demo customers (default 20000)")
    p.add_argument("--snapshots", type=int, default=5, help="whole Snapshots timed (default 5)")
    args = p.parse_args(argv)
    env = DevEnvironment(shards=1, customers=args.customers)
    env.start()
    try:
        node = env.start_node(workers=1, serving_model=args.model)
        times, entities = snapshot_seconds(node.address, args.snapshots)
        print(f"snapshot: {entities} entities; seconds best {min(times):.3f} median {statistics.median(times):.3f}"
              f" ({entities / min(times):,.0f} entities/s at best)")
        time.sleep(1)
        at_rest = rss_mb(node)
        channel, calls = stall(node.address, args.streams, args.read)
        time.sleep(args.settle)
        stalled = rss_mb(node)
        print(f"node RSS ({args.model}): {at_rest:.0f} MB at rest, {stalled:.0f} MB with {args.streams} unread"
              f" StreamResolve streams (+{stalled - at_rest:.0f} MB, {(stalled - at_rest) / args.streams:.2f} MB each)")
        for call in calls:
            call.cancel()
        channel.close()
    finally:
        env.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
