"""What both reports say about the machine and the code they measured (date, CPU, kernel, commit)."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from loadtests.shared.paths import REPO


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
    except OSError:
        models = []
    return models[0] if models else platform.processor() or "unknown"


def kernel() -> str:
    return f"{platform.system()} {platform.release()}"


def git_commit(*, mark_dirty: bool = False) -> str:
    """The checkout's short commit ("unknown" without git), with "(with uncommitted changes)" when
    `mark_dirty` and tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return "unknown"
        if mark_dirty and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                         capture_output=True, text=True, timeout=10).stdout.strip():
            return head + " (with uncommitted changes)"
        return head
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sibling_sets(cpus: Iterable[int], root: Path = Path("/sys/devices/system/cpu")) -> list[tuple[int, ...]]:
    """The CPUs of `cpus` grouped by physical core (Linux topology/thread_siblings_list; every CPU its
    own core where that cannot be read), each group sorted, groups in order of their first CPU."""
    wanted = set(cpus)
    groups: dict[tuple[int, ...], None] = {}
    for cpu in sorted(wanted):
        try:
            text = (root / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
            group = tuple(sorted(c for c in parse_cpu_list(text) if c in wanted)) or (cpu,)
        except (OSError, ValueError):
            group = (cpu,)
        groups.setdefault(group, None)
    return list(groups)


def parse_cpu_list(text: str) -> list[int]:
    """The kernel's CPU list format: "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def cores_first(groups: Sequence[tuple[int, ...]]) -> list[int]:
    """One CPU of every physical core first, then the second thread of every core, and so on: a layout
    that hands out CPUs in this order gives its first roles whole cores, not two threads of one core
    (on a machine with SMT, two busy siblings each run ~0.6-0.7x as fast as one alone)."""
    order: list[int] = []
    for depth in range(max((len(g) for g in groups), default=0)):
        order.extend(g[depth] for g in groups if depth < len(g))
    return order


def describe_topology(groups: Sequence[tuple[int, ...]]) -> str:
    """"16 CPUs on 8 cores (siblings: 0,8 1,9 ...)" or "4 CPUs, one thread per core"."""
    cpus = sum(len(g) for g in groups)
    if all(len(g) == 1 for g in groups):
        return f"{cpus} CPUs, one thread per core"
    pairs = " ".join(",".join(map(str, g)) for g in groups)
    return f"{cpus} CPUs on {len(groups)} cores (siblings: {pairs})"
