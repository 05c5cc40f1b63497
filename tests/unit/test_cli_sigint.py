"""SIGINT stops a command started with SIGINT ignored (server/cli/base.py, `stop_on_sigint`): `crs`,
`crs-dev` and `crs-load` all run through `run_command`, which installs Python's handler that a
background job of a non-interactive shell does not get. No servers: a stand-in command that waits."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sigint import with_sigint_ignored

ROOT = Path(__file__).resolve().parents[2]
WAITS = """
import argparse, signal, sys, time
from server.cli.base import run_command
print("sigint ignored" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "sigint handled", flush=True)
def wait(args):
    print("waiting", flush=True)
    time.sleep(60)
    return 0
parser = argparse.ArgumentParser(prog="waits")
parser.set_defaults(func=wait)
sys.exit(run_command(parser, []))
"""


def test_a_command_started_with_sigint_ignored_stops_on_sigint_with_130() -> None:
    child = subprocess.Popen(with_sigint_ignored([sys.executable, "-c", WAITS]), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        for expected in ("sigint ignored\n", "waiting\n"):
            said = child.stdout.readline()
            if said != expected:   # say why: a child that ended early left its reason on stderr
                child.kill()
                _, err = child.communicate(timeout=30)
                pytest.fail(f"the child said {said!r}, not {expected!r}; exit {child.returncode}; stderr:\n{err}")
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=20) == 130
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
