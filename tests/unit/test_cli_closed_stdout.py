"""A reader that stops early (`crs shards status | head -2`) ends a command quietly with 141, as a shell
reports a process SIGPIPE stopped (server/cli/base.py `run_command`): not a BrokenPipeError taken
for an outage (exit 3) or the interpreter's "Exception ignored" at exit. No servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BREAKS_A_SOCKET = """
import argparse, sys
from server.cli.base import run_command
def fails(args):
    print("some output")
    raise BrokenPipeError(32, "Broken pipe")   # a peer's socket, not stdout
parser = argparse.ArgumentParser(prog="fails")
parser.set_defaults(func=fails)
sys.exit(run_command(parser, []))
"""


def _with_closed_stdout(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    read_end, write_end = os.pipe()
    os.close(read_end)               # the reader is gone before the first line
    try:
        return subprocess.run(argv, cwd=ROOT, env=env, stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("unbuffered", ["", "1"])    # PYTHONUNBUFFERED=1 is how the node image runs
def test_a_closed_stdout_ends_a_command_quietly_with_141(unbuffered: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    r = _with_closed_stdout([sys.executable, "-m", "server.cli", "keys", "generate"], env)
    assert (r.returncode, r.stderr.decode()) == (141, "")


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden() -> None:
    r = subprocess.run([sys.executable, "-c", BREAKS_A_SOCKET], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode not in (0, 141) and "BrokenPipeError" in r.stderr and r.stdout == "some output\n"
