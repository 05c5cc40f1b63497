"""What both reports say about the machine and the code they measured (date, CPU, kernel, commit)."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
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
