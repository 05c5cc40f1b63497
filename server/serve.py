"""`crs serve`: N node processes on one port (SO_REUSEPORT), uvloop, graceful SIGTERM.

The parent process supervises: it starts the workers, restarts one that dies, serves the merged
Prometheus metrics, and on SIGTERM/SIGINT forwards SIGTERM so every worker drains (NOT_SERVING,
answer for drain_delay, stop accepting, finish in-flight calls within grace_seconds) before it exits;
it waits drain_delay + grace_seconds + 5 s for them, then kills what is left. SIGUSR1 makes every
node process write the stacks of all its threads, then of all its asyncio tasks, to stderr (a node
that does not drain: what holds it).
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.context import SpawnProcess
from pathlib import Path

from server.logs import configure_logging
from server.preflight import CONFIGURATION_ERRORS
from server.settings import Settings, SettingsError

log = logging.getLogger("crs.serve")
RESTART_BACKOFF = 1.0
STABLE_SECONDS = 60.0   # a worker that served this long ends a row of failures


class RestartBudget:
    """How many worker exits in a row the parent restarts before it gives up (5 per worker). A worker
    that ran STABLE_SECONDS or more ends the row: exits spread over a pod's life (a background task's
    failure, an operator's SIGTERM to one worker) never add up to giving up."""

    def __init__(self, workers: int) -> None:
        self.limit = 5 * workers
        self.in_a_row = 0

    def exited(self, ran_for: float) -> bool:
        """A worker exited after `ran_for` seconds; True: give up."""
        if ran_for >= STABLE_SECONDS:
            self.in_a_row = 0
        self.in_a_row += 1
        return self.exhausted

    @property
    def exhausted(self) -> bool:
        return self.in_a_row > self.limit


def run_node_process(settings: Settings) -> int:
    """Run one node until SIGTERM/SIGINT. Returns the process exit code."""
    import uvloop

    from server.app import Node

    configure_logging(settings.log_level)

    async def main() -> int:
        node = Node(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # kill -USR1: every thread's stack to stderr at once (C level, even if the loop is stuck), then,
        # from the loop, every task's coroutine stack (what a drain that does not end waits for).
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
        try:
            await node.start()
        except Exception as exc:
            log.error("node failed to start", extra={"error": type(exc).__name__, "reason": str(exc)})
            await node.stop(grace=0)
            return 2 if isinstance(exc, CONFIGURATION_ERRORS) else 3   # `crs --help`'s exit codes
        # SIGTERM/SIGINT, or a background task that failed (server/background.py): drain either way.
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(node.background.broken.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        broken = node.background.broken.is_set()
        log.info("draining", extra={"grace_s": settings.grace_seconds, "reason": "broken" if broken else "signal"})
        await node.stop()
        return 1 if broken else 0

    return uvloop.run(main())


def _dump_tasks() -> None:
    tasks = asyncio.all_tasks()
    print(f"asyncio: {len(tasks)} tasks", file=sys.stderr, flush=True)
    for task in tasks:
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def _worker(settings: Settings, index: int) -> None:
    os.environ["CRS_WORKER_INDEX"] = str(index)
    raise SystemExit(run_node_process(settings))


def _start_metrics(settings: Settings, multiproc_dir: Path | None) -> None:
    """The /metrics server on CRS_METRICS_PORT; SettingsError, naming it, when it cannot listen there
    (preflight found the port free; another process may have taken it since)."""
    if not settings.metrics_port:
        return
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    registry = REGISTRY
    if multiproc_dir is not None:
        from server.metrics import WorkerMetricsCollector

        registry = CollectorRegistry()
        WorkerMetricsCollector(registry, path=str(multiproc_dir))
    port, host = settings.metrics_port, settings.grpc_host
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise SettingsError(f"CRS_METRICS_PORT={port}: cannot serve metrics on {host}:{port}: {exc.strerror}"
                            " (0 = no metrics)") from exc


def _forget_worker(multiproc_dir: Path, pid: int | None) -> None:
    """A worker exited: its gauges (live* modes, server/metrics.py) leave the merged view, so the last
    state it saw (a topology version, an outage) stops counting. Its counters stay: they never go back.
    Done before the replacement starts, which may get the same pid."""
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid, str(multiproc_dir))  # type: ignore[no-untyped-call]


def serve(settings: Settings) -> int:
    """Blocking: run the node processes until SIGTERM/SIGINT; the exit code for the CLI."""
    configure_logging(settings.log_level)
    settings.keyring()  # refuse to start workers with a bad key: the error is clearer here
    workers = settings.effective_workers()
    if workers == 1:
        _start_metrics(settings, None)
        return run_node_process(settings)

    multiproc_dir = Path(tempfile.mkdtemp(prefix="crs-metrics-"))
    # Must be in the environment before prometheus_client is imported by a worker.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    try:
        _start_metrics(settings, multiproc_dir)
    except SettingsError:
        shutil.rmtree(multiproc_dir, ignore_errors=True)
        raise
    ctx = mp.get_context("spawn")
    procs: dict[int, SpawnProcess] = {}
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def dump_workers(signum: int, frame: object) -> None:
        for p in list(procs.values()):
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGUSR1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, dump_workers)

    started: dict[int, float] = {}

    def start(i: int) -> None:
        p = ctx.Process(target=_worker, args=(settings, i), name=f"crs-node-{i}", daemon=False)
        p.start()
        procs[i] = p
        started[i] = time.monotonic()

    for i in range(workers):
        start(i)
    log.info("serving", extra={"workers": workers, "port": settings.grpc_port})
    budget = RestartBudget(workers)
    while not stopping:
        time.sleep(0.2)
        for i, p in list(procs.items()):
            if p.exitcode is not None and not stopping:
                give_up = budget.exited(time.monotonic() - started[i])
                # Exit 0: it drained on a SIGTERM of its own (an operator's), no failure to page on.
                (log.warning if p.exitcode == 0 else log.error)(
                    "worker exited; restarting", extra={"worker": i, "exitcode": p.exitcode})
                _forget_worker(multiproc_dir, p.pid)
                if give_up:
                    log.error("workers keep failing; giving up")
                    stopping = True
                    break
                time.sleep(RESTART_BACKOFF)
                start(i)
    for p in procs.values():
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    # Each worker answers for drain_delay (lame duck), then finishes its calls within grace_seconds.
    deadline = time.monotonic() + settings.drain_delay + settings.grace_seconds + 5
    for p in procs.values():
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs.values()]
    shutil.rmtree(multiproc_dir, ignore_errors=True)   # the workers' metric files: gone with them
    log.info("stopped", extra={"exitcodes": codes})
    return 1 if budget.exhausted else 0
