"""The hybrid node's gRPC thread pool (server/grpc_pool.py) against concurrent.futures' ThreadPoolExecutor.

Two measurements, one run:

  in-process  one thread submits calls (16 in flight, 64 pool threads, all on one CPU) and adds a
              done-callback to each, as grpc.server's completion-queue thread does; CPU per call
  echo        two sync grpc.server echoes (loadtests/bench/echo_server.py --sync), one per pool,
              pinned to one CPU, driven in turn by the same grpc.aio client on the other CPU in
              alternating windows; the server's CPU per call, median and spread of the windows

    python -m loadtests.bench.thread_pool [--windows 8] [--seconds 3]

This VM's windows differ by up to +-20% (CPU per call of the same server); the in-process figures
are steadier. docs/decisions.md ("The gRPC threads' pool") records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

from loadtests.shared import procs
from server.grpc_pool import GrpcThreadPool
from server.settings import Settings

POOLS: dict[str, Callable[[], Executor]] = {
    "futures": lambda: ThreadPoolExecutor(max_workers=64),
    "node": lambda: GrpcThreadPool(64, thread_name_prefix="bench", shed_target=Settings().shed_queue_ms / 1000,
                                   active=Settings().serving_active),
}


def in_process(make: Callable[[], Executor], calls: int = 50_000, in_flight: int = 16) -> float:
    """CPU microseconds per submit, run and done-callback."""
    pool = make()
    slots = threading.Semaphore(in_flight)
    finished = threading.Event()
    left = [calls]
    lock = threading.Lock()

    def ended(_done: Any) -> None:
        slots.release()
        with lock:
            left[0] -= 1
            if not left[0]:
                finished.set()

    started = time.process_time()
    for i in range(calls):
        slots.acquire()
        pool.submit(int, i).add_done_callback(ended)
    finished.wait()
    spent = time.process_time() - started
    pool.shutdown()
    return spent / calls * 1e6


async def _window(address: str, seconds: float, request: bytes) -> int:
    import grpc

    from server import rpc

    method = rpc.methods(rpc.LOOKUP_SERVICE)["ResolveCard"].path
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(4)]
    calls = [ch.unary_unary(method) for ch in channels]
    done = 0
    end = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        while time.perf_counter() < end:
            await calls[i % 4](request, timeout=10)
            done += 1

    await asyncio.gather(*(worker(i) for i in range(16)))
    for ch in channels:
        await ch.close()
    return done


def echoes(windows: int, seconds: float) -> dict[str, list[float]]:
    """Server CPU microseconds per call of each pool's echo, one figure per window."""
    from devstack.demo import demo_pan
    from server.proto import crs_pb2 as pb

    cpus = sorted(os.sched_getaffinity(0))
    servers: dict[str, tuple[subprocess.Popen[str], str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "payload.bin"
        payload.write_bytes(b"x" * 240)   # a ResolveCard answer's size; the client does not parse it
        try:
            for name in POOLS:
                proc = subprocess.Popen([sys.executable, "-m", "loadtests.bench.echo_server", "--payload",
                                         str(payload), "--sync", "--pool", name], stdout=subprocess.PIPE, text=True)
                assert proc.stdout is not None
                ready = proc.stdout.readline().split()
                if ready[:1] != ["READY"]:
                    raise SystemExit(f"the {name} echo did not start")
                servers[name] = (proc, f"127.0.0.1:{ready[1]}")
            if len(cpus) >= 2:
                procs.pin([p.pid for p, _ in servers.values()], {cpus[0]})
                procs.pin_self({cpus[1]})
            request = pb.ResolveCardRequest(pan=demo_pan(0)).SerializeToString()
            for _, address in servers.values():
                asyncio.run(_window(address, 1.0, request))   # warm-up
            per_call: dict[str, list[float]] = {name: [] for name in servers}
            order = list(servers)
            for w in range(windows):
                for name in order if w % 2 == 0 else order[::-1]:
                    proc, address = servers[name]
                    before = procs.cpu_seconds_of(proc.pid) or 0.0
                    n = asyncio.run(_window(address, seconds, request))
                    after = procs.cpu_seconds_of(proc.pid) or 0.0
                    per_call[name].append((after - before) / max(n, 1) * 1e6)
            return per_call
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.thread_pool", description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8, help="measured windows per echo (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one window (default 3)")
    args = parser.parse_args(argv)
    one_cpu = sorted(os.sched_getaffinity(0))[:1]
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(one_cpu))
    print("in-process, CPU us per submit + run + done-callback (16 in flight, 64 threads, one CPU):")
    for rnd in range(3):
        figures = {name: in_process(make) for name, make in POOLS.items()}
        print(f"  round {rnd + 1}: " + ", ".join(f"{name} {us:.1f}" for name, us in figures.items()))
    os.sched_setaffinity(0, saved)
    print(f"sync grpc.server echo, server CPU us per call ({args.windows} alternating windows of {args.seconds:g}s):")
    for name, us in echoes(args.windows, args.seconds).items():
        print(f"  {name:8} median {median(us):6.1f}  min {min(us):6.1f}  max {max(us):6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
