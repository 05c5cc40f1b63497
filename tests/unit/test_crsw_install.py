"""`./crsw`'s first install: one that fails leaves no .venv behind to be reused (an outside check found a
Python 3.13 .venv, whose install had failed for want of pgserver wheels, reused on every later run),
and says how to pick another Python. Runs the real wrapper on a copy, over a project whose install
cannot succeed offline (PIP_NO_INDEX: no network is used)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_failed_first_install_removes_the_venv_and_names_another_python(tmp_path: Path) -> None:
    shutil.copy(ROOT / "crsw", tmp_path / "crsw")
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools-that-is-not-there>=99"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "crsw-install-probe"\nversion = "0"\n')
    leftover = tmp_path / ".venv"
    leftover.mkdir()
    (leftover / "from-an-earlier-failed-install").touch()
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1"}
    r = subprocess.run([str(tmp_path / "crsw"), "crs", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert not leftover.exists(), "the failed install's .venv was left to be reused"
    assert "failed" in r.stderr and "PYTHON=python3.12" in r.stderr and ".venv was removed" in r.stderr, r.stderr
