"""CPU time and CPU pinning of process trees (psutil).

The benchmark's "per server core" figures and the sweep's CPU per lookup divide work done by the
CPU-seconds the measured processes spent (user + system, every thread), read before and after a
measured window. A process tree (PostgreSQL's postmaster and its backends) is summed over every
process in it; a process that appears during the window counts from zero, one that exits during it
is no longer counted (its last reading is lost).

Two sources: psutil's user + system times (/proc/PID/stat, whole process, in clock ticks: 10 ms) and
the scheduler's own run time per thread (/proc/PID/task/TID/schedstat, nanoseconds). The sweep uses
the second (`runtime_snapshot`): a PostgreSQL backend or an idle Redis shard spends a few milliseconds
per second, and 10 ms steps on each of a dozen processes are noise of the order of the figure itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import psutil


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
    except psutil.Error:   # gone
        return None
    return float(times.user + times.system)


def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of one process (all its threads, live and exited; not its children's);
    None if it is gone."""
    try:
        return _cpu_seconds(psutil.Process(pid))
    except psutil.Error:
        return None


def _processes(roots: Iterable[int]) -> list[psutil.Process]:
    """The given processes and all their descendants that are alive now (each once)."""
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            found.setdefault(pid, root)
            for child in root.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:   # gone, or gone while we looked
            continue
    return list(found.values())


def cpu_snapshot(roots: Iterable[int]) -> dict[int, float]:
    """{pid: CPU seconds} for every process in the trees under `roots`."""
    snap: dict[int, float] = {}
    for proc in _processes(roots):
        secs = _cpu_seconds(proc)
        if secs is not None:
            snap[proc.pid] = secs
    return snap


def _thread_runtimes(pid: int) -> dict[int, float] | None:
    """{tid: seconds on a CPU} of every live thread of `pid` from schedstat; None when unreadable."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):   # the thread exited while we looked
            continue
    return out


def schedstat_available() -> bool:
    return bool(_thread_runtimes(os.getpid()))


def runtime_snapshot(roots: Iterable[int]) -> dict[int, float]:
    """{tid: seconds on a CPU} for every live thread of every process in the trees under `roots`, in
    nanosecond resolution (schedstat). Thread ids are unique while they live, so `cpu_delta` takes it
    like a `cpu_snapshot`; a thread that exits during a window loses its time in that window. Falls back
    to `cpu_snapshot` (keyed by pid) where the kernel has no schedstat."""
    if not schedstat_available():
        return cpu_snapshot(roots)
    snap: dict[int, float] = {}
    for proc in _processes(roots):
        threads = _thread_runtimes(proc.pid)
        if threads:
            snap.update(threads)
    return snap


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots; processes new in `after` count from zero."""
    return sum(max(0.0, secs - before.get(pid, 0.0)) for pid, secs in after.items())


def pin(roots: Iterable[int], cpus: Iterable[int]) -> int:
    """Pin every thread of every process in the trees under `roots` to `cpus`. Returns threads pinned.

    sched_setaffinity acts on one thread (psutil's cpu_affinity too, on Linux: the main one), and
    threads created later inherit from their creator, so every existing thread is pinned. Errors (a
    thread that just exited, no permission) are skipped: pinning is best effort and the report says
    whether it was on.
    """
    cpus = set(cpus)
    return sum(_pin_threads(proc, cpus) for proc in _processes(roots)) if cpus else 0


def _pin_threads(proc: psutil.Process, cpus: set[int]) -> int:
    try:
        threads = proc.threads()
    except psutil.Error:
        return 0
    done = 0
    for thread in threads:
        try:
            os.sched_setaffinity(thread.id, cpus)
            done += 1
        except OSError:
            pass
    return done


@contextlib.contextmanager
def paused(roots: Iterable[int]) -> Iterator[int]:
    """SIGSTOP every process in the trees under `roots` for the block, SIGCONT after, even on an error
    (a process that is gone is skipped). Yields how many were stopped."""
    stopped: list[psutil.Process] = []
    try:
        for proc in _processes(roots):
            try:
                proc.suspend()
                stopped.append(proc)
            except psutil.Error:
                continue
        yield len(stopped)
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.Error):
                proc.resume()


def pin_self(cpus: set[int]) -> None:
    """Pin every thread of this process, not the processes it started (call it early: later threads and
    children inherit it). It pinned its children too, so a bench that pinned its servers and then
    itself put them all on its own CPU (server_model.py, thread_pool.py; found 2026-12-05)."""
    _pin_threads(psutil.Process(), set(cpus))
