"""Server-model experiment (DESIGN.md §2): grpc.aio vs the sync grpc.server, echo and a real
near-cache hit, per server core.

A near-cache hit needs no I/O, so it could run on the sync server, whose bare per-core rate is said
to beat grpc.aio's by ~45%. This measures, in one run, four single-process servers pinned to CPU 0
and driven by the same sync-thread client on CPU 1:

  aio-echo   grpc.aio on uvloop answering canned bytes (the benchmark's ceiling)
  sync-echo  grpc.server (thread pool) answering the same bytes
  aio-hit    grpc.aio running the hit path: parse ResolveCardRequest, parse_pan (length, ASCII, Luhn),
             HMAC fingerprint, cache key, NearCache.get, metrics — the node's own functions
  sync-hit   the same work on grpc.server

    python -m loadtests.bench.server_model [--seconds 5] [--threads 8] [--workers 8]

Prints calls/s per server CPU-second and the ratios. docs/decisions.md records the result.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from devstack import free_port
from devstack.demo import demo_pan
from loadtests.shared import procs
from server import cache_keys as ck
from server import rpc
from server.cache.near import NearCache
from server.crypto import Keyring, new_key
from server.metrics import Metrics
from server.pan import parse_pan
from server.proto import crs_pb2 as pb

METHOD = rpc.methods(rpc.LOOKUP_SERVICE)["ResolveCard"]
HOT_KEYS = 256
MODES = ("aio-echo", "sync-echo", "aio-hit", "sync-hit")
PAYLOAD = pb.Resolution(
    card=pb.Card(token="tok_" + "a" * 24, masked_pan="999000******0003", bin="999000", last4="0003",
                 status=pb.CARD_STATUS_ACTIVE, expiry="2029-01", account_id="acc_demo0000000000", version=1),
    account=pb.Account(account_id="acc_demo0000000000", routing_number="999000014", last4="0000",
                       masked_account_number="********0000", type=pb.ACCOUNT_TYPE_CHECKING, currency="USD",
                       status=pb.ACCOUNT_STATUS_OPEN, version=1),
    customer=pb.Customer(customer_id="cus_demo0000000000", display_name="Ada Lovelace", segment="retail",
                         status=pb.CUSTOMER_STATUS_ACTIVE, kyc_status=pb.KYC_STATUS_VERIFIED, version=1),
    in_good_standing=True).SerializeToString()


def hit_path() -> Callable[[bytes], bytes]:
    """The node's work for a near-cache hit, as one synchronous function over the node's own code."""
    keyring = Keyring(fingerprint_keys={1: new_key()}, fingerprint_version=1, kek=new_key())
    near = NearCache(max_entries=100_000, ttl=3600)
    for i in range(HOT_KEYS):
        near.put(ck.card_key(1, keyring.fingerprint(demo_pan(i))), PAYLOAD)
    metrics = Metrics()
    parse_request = METHOD.request.FromString

    def resolve(raw: bytes) -> bytes:
        started = time.perf_counter()
        pan = parse_pan(parse_request(raw).pan)   # type: ignore[attr-defined]
        value = near.get(ck.card_key(1, keyring.fingerprint(pan)))
        assert value is not None
        metrics.tier_hit("l1")
        metrics.observe_rpc("ResolveCard", "OK", time.perf_counter() - started)
        return value

    return resolve


def serve(mode: str, port: int, workers: int) -> None:
    answer: Callable[[bytes], bytes] = hit_path() if mode.endswith("hit") else (lambda raw: PAYLOAD)
    address = f"127.0.0.1:{port}"
    if mode.startswith("sync"):
        server = grpc.server(ThreadPoolExecutor(max_workers=workers))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(METHOD.service, {
            METHOD.name: grpc.unary_unary_rpc_method_handler(lambda raw, ctx: answer(raw))}),))
        server.add_insecure_port(address)
        server.start()
        print("READY", flush=True)
        signal.sigwait({signal.SIGTERM})
        server.stop(0)
        return
    import asyncio

    import uvloop

    async def main() -> None:
        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return answer(raw)

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(METHOD.service, {
            METHOD.name: grpc.unary_unary_rpc_method_handler(handler)}),))
        server.add_insecure_port(address)
        await server.start()
        print("READY", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0)

    uvloop.run(main())


def measure(mode: str, *, seconds: float, threads: int, workers: int) -> float:
    """Calls per CPU-second of the server process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.bench.server_model", "--serve", mode, "--port", str(port),
                             "--workers", str(workers)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            procs.pin([proc.pid], {cpus[0]})
            procs.pin_self({cpus[1]})
        requests = [pb.ResolveCardRequest(pan=demo_pan(i)).SerializeToString() for i in range(HOT_KEYS)]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary(METHOD.path)
        call(requests[0], timeout=10)
        stop, counts = threading.Event(), [0] * threads

        def client(n: int) -> None:
            i = n
            while not stop.is_set():
                call(requests[i % HOT_KEYS], timeout=10)
                counts[n] += 1
                i += threads

        pool = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(threads)]
        for t in pool:
            t.start()
        time.sleep(1.0)                     # warm-up
        done0, cpu0 = sum(counts), procs.cpu_seconds_of(proc.pid) or 0.0
        time.sleep(seconds)
        done1, cpu1 = sum(counts), procs.cpu_seconds_of(proc.pid) or 0.0
        stop.set()
        for t in pool:
            t.join()
        channel.close()
        return (done1 - done0) / max(cpu1 - cpu0, 1e-9)
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.server_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per mode and round (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the best per mode counts (default 2)")
    p.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--workers", type=int, default=8, help="sync server thread pool size (default 8)")
    p.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.workers)
        return 0
    best = dict.fromkeys(MODES, 0.0)
    for r in range(args.rounds):
        for mode in MODES:
            rate = measure(mode, seconds=args.seconds, threads=args.threads, workers=args.workers)
            best[mode] = max(best[mode], rate)
            print(f"round {r + 1} {mode:10} {rate:8,.0f} calls per server CPU-second", flush=True)
    print()
    for mode in MODES:
        print(f"{mode:10} {best[mode]:8,.0f}/s per core   {best[mode] / best['aio-echo']:.2f}x aio echo")
    print(f"\nsync vs aio: echo {best['sync-echo'] / best['aio-echo']:.2f}x, near-cache hit"
          f" {best['sync-hit'] / best['aio-hit']:.2f}x; the hit path costs"
          f" {1e6 / best['aio-hit'] - 1e6 / best['aio-echo']:.0f} µs over echo on aio,"
          f" {1e6 / best['sync-hit'] - 1e6 / best['sync-echo']:.0f} µs on sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
