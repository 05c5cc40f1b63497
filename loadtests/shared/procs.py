"""Process CPU time and CPU pinning from /proc (Linux), without extra dependencies.

The benchmark's "per server core" figures divide work done by the CPU-seconds the server process
spent (user + system, every thread), read from /proc/PID/stat before and after a measured window.
A process tree (PostgreSQL's postmaster and its backends) is summed over every process in it; a
process that appears during the window counts from zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of one process (all its threads, live and exited); None if gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                out[int(name)] = int(fields[1])
    return out


def tree(roots: Iterable[int]) -> list[int]:
    """The given pids and all their descendants that are alive now."""
    wanted = [p for p in roots if os.path.exists(f"/proc/{p}")]
    if not wanted:
        return []
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    seen: set[int] = set()
    stack = list(wanted)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def cpu_snapshot(roots: Iterable[int]) -> dict[int, float]:
    """{pid: CPU seconds} for every process in the trees under `roots`."""
    snap: dict[int, float] = {}
    for pid in tree(roots):
        secs = cpu_seconds_of(pid)
        if secs is not None:
            snap[pid] = secs
    return snap


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots; processes new in `after` count from zero."""
    return sum(max(0.0, secs - before.get(pid, 0.0)) for pid, secs in after.items())


def pin(roots: Iterable[int], cpus: Iterable[int]) -> int:
    """Pin every thread of every process in the trees under `roots` to `cpus`. Returns threads pinned.

    sched_setaffinity acts on one thread, and threads created later inherit from their creator, so
    every existing thread (/proc/PID/task/*) is pinned. Errors (a thread that just exited, no
    permission) are skipped: pinning is best effort and the report says whether it was on.
    """
    cpus = set(cpus)
    if not cpus:
        return 0
    done = 0
    for pid in tree(roots):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
                done += 1
            except OSError:
                pass
    return done


def pin_self(cpus: set[int]) -> None:
    """Pin every thread of this process (call it early: later threads inherit it)."""
    pin([os.getpid()], cpus)
