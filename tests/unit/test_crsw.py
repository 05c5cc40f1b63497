"""`./crsw` runs a command in the caller's directory: a relative path a user gives lands where the user
is, not in the repository (an outside check found `./crsw crs-dev sample-bins base.csv`, run from
/tmp, writing into the repository). `./crsw test` still runs the repository's suite from anywhere.

Runs the real wrapper, but only over an installed .venv: a fresh checkout's first run installs the
project from PyPI (a minute, and a network), which is no unit test's business."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAMP = ROOT / ".venv" / ".crs-installed"

pytestmark = pytest.mark.skipif(
    not STAMP.exists() or (ROOT / "pyproject.toml").stat().st_mtime > STAMP.stat().st_mtime,
    reason="./crsw would install .venv first (run ./crsw once)")


def _crsw(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "crsw"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_relative_path_is_the_callers(tmp_path: Path) -> None:
    name = f"bins-{tmp_path.name}.csv"
    r = _crsw(tmp_path, "crs-dev", "sample-bins", name, "--ranges", "20")
    assert not (ROOT / name).exists(), "crsw wrote into the repository"
    assert r.returncode == 0, r.stderr
    assert (tmp_path / name).read_text().startswith("low,high,")


def test_commands_find_the_project_from_elsewhere(tmp_path: Path) -> None:
    r = _crsw(tmp_path, "crs", "--help")
    assert r.returncode == 0 and "Exit codes" in r.stdout, r.stderr
    collected = _crsw(tmp_path, "test", "--collect-only", "-q", "tests/unit/test_crsw.py")
    assert collected.returncode == 0 and "test_a_relative_path_is_the_callers" in collected.stdout, collected.stderr
