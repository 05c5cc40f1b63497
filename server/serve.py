"""`crs serve`: N node processes on one port (SO_REUSEPORT), uvloop, graceful SIGTERM.

The parent process supervises: it starts the workers, restarts one that exits (backing off:
`Supervision`), kills and restarts one whose event loop has stopped beating for
CRS_LOOP_STALL_SECONDS (SIGSTOP, a deadlock), serves the merged Prometheus metrics, and on
SIGTERM/SIGINT/SIGHUP forwards SIGTERM so every worker drains (NOT_SERVING, answer for drain_delay,
stop accepting, finish in-flight calls within grace_seconds, tear down) before it exits; it waits
for them that long plus the teardown's bounds and 5 s, then kills what is left (and exits 1). A
worker whose parent dies gets SIGTERM and drains (Linux). SIGUSR1 makes every node process write
the stacks of all its threads, then of all its asyncio tasks, to stderr (a node that does not
drain: what holds it).
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
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any

from server.background import STOP_SECONDS
from server.logs import configure_logging
from server.preflight import CONFIGURATION_ERRORS
from server.settings import Settings, SettingsError

log = logging.getLogger("crs.serve")
RESTART_BACKOFF = 1.0       # seconds before a worker's first restart; doubled for each exit in a row
RESTART_BACKOFF_MAX = 30.0  # ... up to this
STABLE_SECONDS = 60.0       # a worker that ran this long ends its row of exits
GIVE_UP_AFTER = 5           # exits in a row per worker, none serving meanwhile, before the parent gives up
HEARTBEAT_INTERVAL = 1.0    # seconds between a worker's event-loop beats (its health, its parent)
STACK_DUMP_WAIT = 1.0       # seconds a stuck worker gets to write its stacks (SIGUSR1) before SIGKILL
STACK_DUMP_GAP = 0.3        # seconds between two workers' dumps (kill -USR1 on the parent)
EXIT_CONFIGURATION = 2      # `crs --help`'s exit codes: 2 the configuration is wrong, 3 a dependency is down


class Supervision:
    """When the parent restarts a worker that exited, and when it gives up.

    A worker is restarted after RESTART_BACKOFF seconds, doubled for each exit in its row up to
    RESTART_BACKOFF_MAX; one that ran STABLE_SECONDS ends its row, so exits spread over a pod's life
    never add up. The parent gives up (stops the workers; `crs serve` exits 1, or 2 when the last
    exit said the configuration is wrong) only while no worker serves: GIVE_UP_AFTER exits per worker
    in a row, or one exit 2. While a sibling serves, a worker that keeps failing is retried for ever
    and the sibling is never stopped for it: with PostgreSQL down a replacement exits 3 until it is
    back, while the sibling still answers from Redis (giving up took the pod down: CrashLoopBackOff)."""

    def __init__(self, workers: int) -> None:
        self.limit = GIVE_UP_AFTER * workers
        self.rows = [0] * workers   # each worker's exits in a row
        self.unserved = 0           # exits since a worker last served
        self.verdict = 0            # once given up: the exit code for `crs serve`

    def serving(self) -> None:
        """A worker serves now: the exits before do not count towards giving up."""
        self.unserved = 0

    def exited(self, worker: int, ran_for: float, exitcode: int, others_serving: bool) -> float | None:
        """Worker `worker` exited after `ran_for` seconds: seconds until its restart, or None to give up."""
        if ran_for >= STABLE_SECONDS:   # it served until now: its row and the count start again
            self.rows[worker] = self.unserved = 0
        self.rows[worker] += 1
        if others_serving:
            self.unserved = 0
        else:
            self.unserved += 1
            if exitcode == EXIT_CONFIGURATION or self.unserved > self.limit:
                self.verdict = EXIT_CONFIGURATION if exitcode == EXIT_CONFIGURATION else 1
                return None
        return min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2.0 ** (self.rows[worker] - 1))


def run_node_process(settings: Settings, beat: Any = None) -> int:
    """Run one node until SIGTERM/SIGINT/SIGHUP. Returns the process exit code. `beat`: a shared
    double the loop sets to time.monotonic() each HEARTBEAT_INTERVAL (the parent's view of it)."""
    import uvloop

    from server.app import Node
    from server.sync_health import ThreadedHealth

    configure_logging(settings.log_level, repeat_interval=settings.log_repeat_interval)

    async def heartbeat(health: ThreadedHealth | None) -> None:
        while True:
            if health is not None:
                health.beat()
            if beat is not None:
                beat.value = time.monotonic()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def main() -> int:
        node = Node(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # SIGHUP: a closed terminal
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
            return EXIT_CONFIGURATION if isinstance(exc, CONFIGURATION_ERRORS) else 3
        beats = asyncio.create_task(heartbeat(node.health if isinstance(node.health, ThreadedHealth) else None))
        # SIGTERM/SIGINT, or a background task that failed (server/background.py): drain either way.
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(node.background.broken.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        broken = node.background.broken.is_set()
        log.info("draining", extra={"grace_s": settings.grace_seconds, "reason": "broken" if broken else "signal"})
        await node.stop()
        beats.cancel()
        return 1 if broken else 0

    return uvloop.run(main())


def _dump_tasks() -> None:
    tasks = asyncio.all_tasks()
    print(f"asyncio: {len(tasks)} tasks", file=sys.stderr, flush=True)
    for task in tasks:
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def _worker(settings: Settings, index: int, beat: Any, parent: int) -> None:
    os.environ["CRS_WORKER_INDEX"] = str(index)
    _die_with(parent)
    raise SystemExit(run_node_process(settings, beat))


def _die_with(parent: int) -> None:
    """SIGTERM (a drain) when the parent dies, however it dies (SIGKILL, the OOM killer): a worker must
    not serve on unsupervised, its metrics unmerged, holding the port. Linux only (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent:   # it died before the line above: no signal will come
        raise SystemExit(0)


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
    state it saw (a topology version, an outage) stops counting. Its counters stay, they never go back,
    folded into the retired workers' files (server/metric_files.py): its own would pile up, one set per
    restart. Done before the replacement starts, which may get the same pid."""
    from server.metric_files import retire_worker

    if pid is not None:
        retire_worker(multiproc_dir, pid)


class _Slot:
    """One worker's place: its current process, when that started, its heartbeat, its next restart."""

    def __init__(self, index: int, ctx: SpawnContext) -> None:
        self.index = index
        self.beat: Any = ctx.RawValue("d", 0.0)   # time.monotonic() of the worker loop's last beat; 0: none yet
        self.proc: SpawnProcess | None = None
        self.started = 0.0
        self.restart_at: float | None = None

    def silent_for(self, now: float) -> float:
        """Seconds since the worker's loop last beat; 0 before its first beat (it is starting)."""
        beat: float = self.beat.value
        return now - beat if beat else 0.0

    def stuck(self, now: float, stall: float) -> bool:
        return bool(stall) and self.silent_for(now) > stall

    def serving(self, now: float, stall: float) -> bool:
        return self.proc is not None and self.proc.exitcode is None and self.beat.value > 0 \
            and not self.stuck(now, stall)


def serve(settings: Settings) -> int:
    """Blocking: run the node processes until SIGTERM/SIGINT/SIGHUP; the exit code for the CLI."""
    configure_logging(settings.log_level, repeat_interval=settings.log_repeat_interval)
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
    slots = [_Slot(i, ctx) for i in range(workers)]
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def dump_workers(signum: int, frame: object) -> None:
        # One worker at a time: they write to the same stderr, and dumps written at once interleave
        # mid-line (a CI run found one worker's "Current thread" line cut in two).
        for slot in slots:
            if slot.proc is not None and slot.proc.pid is not None and slot.proc.exitcode is None:
                os.kill(slot.proc.pid, signal.SIGUSR1)
                time.sleep(STACK_DUMP_GAP)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGUSR1, dump_workers)

    def start(slot: _Slot) -> None:
        slot.beat.value = 0.0
        slot.proc = ctx.Process(target=_worker, args=(settings, slot.index, slot.beat, os.getpid()),
                                name=f"crs-node-{slot.index}", daemon=False)
        slot.proc.start()
        slot.started, slot.restart_at = time.monotonic(), None

    for slot in slots:
        start(slot)
    log.info("serving", extra={"workers": workers, "port": settings.grpc_port})
    supervision = Supervision(workers)
    stall = settings.loop_stall_seconds
    while not stopping:
        time.sleep(0.2)
        now = time.monotonic()
        if any(slot.serving(now, stall) for slot in slots):
            supervision.serving()
        for slot in slots:
            if stopping:
                break
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    start(slot)
                continue
            if slot.proc is None:
                continue
            if slot.proc.exitcode is None:
                if slot.stuck(now, stall):
                    _kill_stuck(slot.proc, slot.silent_for(now))
                continue
            code = slot.proc.exitcode
            others = any(other.serving(now, stall) for other in slots if other is not slot)
            delay = supervision.exited(slot.index, now - slot.started, code, others)
            # Exit 0: it drained on a SIGTERM of its own (an operator's), no failure to page on.
            (log.warning if code == 0 else log.error)(
                "worker exited; restarting" if delay is not None else "worker exited",
                extra={"worker": slot.index, "exitcode": code, "restart_in_s": delay})
            _forget_worker(multiproc_dir, slot.proc.pid)
            if delay is None:
                log.error("no worker serves and they keep failing; giving up", extra={"exitcode": supervision.verdict})
                stopping = True
                break
            slot.restart_at = now + delay
    procs = [slot.proc for slot in slots if slot.proc is not None]
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    # Each worker answers for drain_delay (lame duck), finishes its calls within grace_seconds, then
    # tears down: its background tasks (STOP_SECONDS) and three PostgreSQL steps, each up to pg_timeout.
    deadline = time.monotonic() + settings.drain_delay + settings.grace_seconds + STOP_SECONDS \
        + 3 * settings.pg_timeout + 5
    killed = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            killed.append(p.name)
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    shutil.rmtree(multiproc_dir, ignore_errors=True)   # the workers' metric files: gone with them
    if killed:
        log.error("workers did not stop in time; killed", extra={"workers": killed})
    log.info("stopped", extra={"exitcodes": codes})
    return supervision.verdict or (1 if killed else 0)


def _kill_stuck(proc: SpawnProcess, silent_for: float) -> None:
    """A worker alive whose event loop has not beaten for CRS_LOOP_STALL_SECONDS (stopped with SIGSTOP,
    deadlocked, blocked in a call) answers none of the connections the kernel gives it: its stacks go to
    the log, then it is killed; the loop restarts it like any worker that exited."""
    log.error("worker's event loop stopped; killing it", extra={"worker": proc.name, "silent_s": round(silent_for, 1)})
    if proc.pid is not None:
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(STACK_DUMP_WAIT)
    proc.kill()
    proc.join(5)
