"""What Watches catching up from an old checkpoint cost the lookups of the same node: the latency of
PostgreSQL misses while --watches Watches read --events change events from the table.

    .venv/bin/python -m loadtests.bench.catch_up_storm --watches 384 --clients 1 --model hybrid

One node process on the embedded stack, mutual TLS, with its default stream limits; each of
--clients extract jobs has a certificate of its own (the node's catch-up turns are per client:
server/feed/service.py, ClientTurns), the Watches dealt over them. --events customer events are
written to the outbox first (~250 bytes of state each). Then, one after the other: misses alone
(each key a card number no card has, so each reads PostgreSQL; sent from a process of its own, so
that the Watch readers' threads do not hold its GIL), and misses while every Watch starts at
sequence 1 and reads to its first Progress mark (caught up, then cancelled). Printed: the misses'
p50 / p99 / max in each phase, how long the Watches took to catch up, and the Watches that failed.
An outside audit measured a miss held 3.9 s by 384 Watches of one client from sequence 0. On a
2-core machine the readers share the cores with the node: compare runs of one machine only, and
--split-cpus (Linux) keeps this process, the Watches' readers, on the last CPU and everything it
started (the node, PostgreSQL, Redis, the miss prober) on the others, so that the readers cannot
starve the node as no consumer on another machine would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import grpc
import psutil

from devstack.demo import demo_pan
from devstack.environment import DevEnvironment, NodeProcess, open_channel
from devstack.pki import DevPki, write_dev_pki
from loadtests.bench.report import percentile
from loadtests.shared.procs import pin, pin_self
from server import rpc
from server.proto import crs_pb2 as pb


async def write_events(dsn: str, events: int) -> None:
    state = pb.Customer(customer_id="cus_catch_up", display_name="x" * 200).SerializeToString()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO outbox (event_type, entity_type, entity_id, feed_type, feed_op, feed_id, feed_version,"
            " state, invalidated_at, settled_at) SELECT 'customer.updated', 'customer', 'cus_catch_up', 1, 2,"
            " 'cus_catch_up', g, $1, now(), now() FROM generate_series(1, $2) g", state, events)
    finally:
        await conn.close()


def misses(address: str, pki: DevPki, start: int, stop: Any, count: int, out: Any) -> None:
    """In a process of its own (the Watch readers' threads must not hold this client's GIL): latencies
    (ms) of misses one after another, `count` of them or until `stop` is set, put on `out`."""
    took: list[float] = []
    with open_channel(address, pki, "switch") as channel:
        lookup = rpc.stub(channel, "LookupService")
        n = start
        while len(took) < count if count else not stop.is_set():
            n += 1
            began = time.perf_counter()
            try:
                lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(n)), timeout=30)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            took.append((time.perf_counter() - began) * 1000)
            time.sleep(0.01)
    out.put(took)


def probe(node: NodeProcess, pki: DevPki, start: int, count: int = 0) -> tuple[Callable[[], list[float]], Any]:
    """Start misses(); (a function that waits for its latencies, the event that stops it)."""
    spawn = multiprocessing.get_context("spawn")
    stop, out = spawn.Event(), spawn.Queue()
    child = spawn.Process(target=misses, args=(node.address, pki, start, stop, count, out))
    child.start()

    def result() -> list[float]:
        while True:
            try:
                took: list[float] = out.get(timeout=1)
            except queue.Empty:
                if not child.is_alive():
                    raise RuntimeError(f"the miss prober exited {child.exitcode} without its latencies") from None
                continue
            child.join()
            return took

    return result, stop


def summary(took: list[float]) -> str:
    ordered = sorted(took)
    return (f"{len(took)} misses: p50 {percentile(ordered, 50):.1f} ms, p99 {percentile(ordered, 99):.1f} ms,"
            f" max {ordered[-1]:.1f} ms")


def split_cpus() -> tuple[int, list[int]]:
    """This process on the last CPU, every process it started on the others: (the readers' CPU, the rest)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--split-cpus needs at least 2 CPUs")
    pin([child.pid for child in psutil.Process().children()], cpus[:-1])
    pin_self({cpus[-1]})
    return cpus[-1], cpus[:-1]


def storm(node: NodeProcess, pki: DevPki, clients: list[str], watches: int,
          split: bool = False) -> tuple[list[float], float, dict[str, int]]:
    """Misses while the Watches catch up; (miss latencies, seconds until every Watch was caught up or
    failed, the failures by code and message)."""
    channels = {client: open_channel(node.address, pki, client) for client in clients}
    done = threading.Semaphore(0)
    failed: list[grpc.RpcError] = []

    def watch(call: grpc.Future) -> None:
        try:
            for event in call:
                if event.HasField("progress"):
                    break
        except grpc.RpcError as exc:
            failed.append(exc)
        call.cancel()   # caught up: give its place back (the node takes 256 calls a connection: rpc.SERVER_OPTIONS)
        done.release()

    result, stop = probe(node, pki, 10**6)
    time.sleep(2.0)   # the prober's process started and probing
    if split:
        readers, rest = split_cpus()
        print(f"readers on CPU {readers}; the node, PostgreSQL, Redis and the miss prober on {rest}")
    began = time.perf_counter()
    for n in range(watches):
        feed = rpc.stub(channels[clients[n % len(clients)]], "ChangeFeedService")
        call = feed.Watch(pb.WatchRequest(from_sequence=1), timeout=900)
        threading.Thread(target=watch, args=(call,), daemon=True).start()
    for _ in range(watches):
        done.acquire()
    seconds = time.perf_counter() - began
    stop.set()
    took = result()
    for ch in channels.values():
        ch.close()
    kinds: dict[str, int] = {}
    for exc in failed:
        kind = f"{exc.code().name}: {exc.details()}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return took, seconds, kinds


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.catch_up_storm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("hybrid", "aio"), default="hybrid", help="CRS_SERVING_MODEL (default hybrid)")
    p.add_argument("--watches", type=int, default=384, help="Watches from sequence 1 (default 384)")
    p.add_argument("--clients", type=int, default=1, help="extract jobs the Watches are dealt over (default 1)")
    p.add_argument("--events", type=int, default=5_000, help="change events to catch up on (default 5000)")
    p.add_argument("--customers", type=int, default=2_000, help="demo customers (default 2000)")
    p.add_argument("--catch-up-reads", type=int, default=0,
                   help="CRS_FEED_CATCH_UP_READS of the node (default 0: the node's own default)")
    p.add_argument("--split-cpus", action="store_true",
                   help="Linux: the Watches' readers on the last CPU, the node and its servers on the others")
    args = p.parse_args(argv)
    if args.watches < 1 or args.clients < 1:
        p.error("--watches and --clients must be at least 1")
    clients = [f"extract-{n}" for n in range(args.clients)]
    env = DevEnvironment(shards=1, customers=args.customers)
    env.start()
    try:
        asyncio.run(write_events(env.admin_dsn, args.events))
        base = env.work_dir / "catch-up-storm"
        pki = write_dev_pki(base / "pki", ("admin", "switch", *clients))
        clients_file = base / "clients.json"
        policies = {name: {"scopes": ["feed:read"], "cert_names": [name]} for name in clients}
        policies["switch"] = {"scopes": ["lookup:card"], "cert_names": ["switch"]}
        clients_file.write_text(json.dumps({"clients": policies}))
        node = env.start_node(workers=1, serving_model=args.model, tls_cert_file=str(pki.server_cert),
                              tls_key_file=str(pki.server_key), tls_client_ca_file=str(pki.ca_cert),
                              clients_file=str(clients_file), pki=pki, feed_catch_up_reads=args.catch_up_reads)
        wait, _stop = probe(node, pki, 2 * 10**6, count=200)   # _stop kept: the child unpickles it
        alone = wait()
        print(f"{args.model}: alone: {summary(alone)}")
        during, seconds, failed = storm(node, pki, clients, args.watches, args.split_cpus)
        print(f"{args.model}: while {args.watches} Watches of {args.clients} client(s) catch up on {args.events:,}"
              f" events: {summary(during)}; all caught up in {seconds:.1f} s;"
              f" {sum(failed.values())} Watch(es) failed{': ' if failed else ''}{failed or ''}")
    finally:
        env.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
