"""devstack/child_exec.py: what the embedded launcher's children go through instead of a preexec_fn
(so subprocess vforks and gRPC's atfork handlers never run in them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.processes import RunAs, exec_argv

PRINT_DEATH_SIGNAL = ("import ctypes; libc = ctypes.CDLL(None); sig = ctypes.c_int(-1);"
                      " libc.prctl(2, ctypes.byref(sig), 0, 0, 0); print(sig.value)")   # PR_GET_PDEATHSIG


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_program_runs_with_the_death_signal_armed() -> None:
    out = subprocess.run(exec_argv([sys.executable, "-c", PRINT_DEATH_SIGNAL], run_as=None,
                                   death_signal=signal.SIGTERM), capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, str(int(signal.SIGTERM)))
    none = subprocess.run(exec_argv([sys.executable, "-c", PRINT_DEATH_SIGNAL], run_as=None, death_signal=0),
                          capture_output=True, text=True, timeout=30)
    assert none.stdout.strip() == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_parent_already_gone_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    argv = exec_argv(["/bin/sh", "-c", f"touch {marker}"], run_as=None, death_signal=signal.SIGTERM)
    argv[5] = str(os.getpid() + 1_000_000)   # PARENT_PID: not the launcher's parent
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "is gone" in out.stderr
    assert not marker.exists()


def test_a_program_that_cannot_run_is_named() -> None:
    out = subprocess.run(exec_argv(["/nonexistent/crs-server"], run_as=None, death_signal=0),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 127
    assert "cannot run /nonexistent/crs-server" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_it_drops_to_the_user_and_clears_groups() -> None:
    nobody = RunAs("nobody", 65534, 65534)
    out = subprocess.run(exec_argv(["/bin/sh", "-c", "id -u; id -g; id -G"], run_as=nobody, death_signal=0),
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["65534", "65534", "65534"], out
