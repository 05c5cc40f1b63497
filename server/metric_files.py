"""The workers' metric files (prometheus_client's multiprocess mode) once a worker has died.

prometheus_client leaves a dead process's counter and histogram files where they are (its
`mark_process_dead` removes only live gauges' files), and the merge reads every file at every scrape.
A pod whose workers restart (crashes, stuck loops killed, a crash loop while PostgreSQL is down: a
restart every 30 s) gathered them for its whole life: 64 KiB or more each, in the pod's /tmp (an
emptyDir of 256 MiB in k8s/base; past it the kubelet evicts the pod), read at every scrape.
`retire_worker` folds a dead worker's counts into one file per kind (`counter_retired.db`,
`histogram_retired.db`, merged like any worker's file) and removes its own, so the directory holds the
live workers' files and those two, however many workers died. The totals never change: the new retired
file is written apart and swapped in under `FILES_LOCK`, which the supervisor's merge
(metrics.WorkerMetricsCollector) also takes, so no scrape sees a count twice or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

log = logging.getLogger("crs.serve")
FILES_LOCK = threading.Lock()   # held while the retired files change, and while a scrape reads the files
# (key, value, timestamp, position) of every value in a file (prometheus_client's, untyped)
read_values: Callable[[str], Iterable[tuple[str, float, float, int]]] = MmapedDict.read_all_values_from_file
KINDS = ("counter", "histogram")   # the kinds whose counts outlive their worker (gauges go with it)


def retire_worker(directory: Path, pid: int) -> None:
    """Worker `pid` has exited: its gauges leave the merge, its counts go into the retired files. A file
    that cannot be written (the directory full) leaves the worker's own file in place, counted as before:
    never an error for the supervisor, whose loop this is."""
    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    for kind in KINDS:
        dead = directory / f"{kind}_{pid}.db"
        fresh = directory / f"{kind}_retired.db.new"   # not *.db: no scrape reads it half written
        try:
            if dead.exists():
                _fold(dead, directory / f"{kind}_retired.db", fresh)
        except OSError as exc:
            log.warning("could not fold a dead worker's metrics into the retired file; its file stays",
                        extra={"file": dead.name, "error": type(exc).__name__})
            with contextlib.suppress(OSError):
                fresh.unlink(missing_ok=True)


def _fold(dead: Path, retired: Path, fresh: Path) -> None:
    totals: dict[str, tuple[float, float]] = {}
    for path in (retired, dead):
        if path.exists():
            for key, value, stamp, _ in read_values(str(path)):
                before = totals.get(key, (0.0, 0.0))
                totals[key] = (before[0] + value, max(before[1], stamp))
    fresh.unlink(missing_ok=True)
    written = MmapedDict(str(fresh))  # type: ignore[no-untyped-call]
    try:
        for key, (value, stamp) in totals.items():
            written.write_value(key, value, stamp)  # type: ignore[no-untyped-call]
    finally:
        written.close()  # type: ignore[no-untyped-call]
    with FILES_LOCK:
        os.replace(fresh, retired)
        dead.unlink()
