"""`crs-dev up --customers 0`: a whole stack with an empty database (for one's own `crs import`),
which used to end in a traceback: the sample lookup it prints found no demo card. Starts servers of
its own (one Redis shard, one node process), as `./crsw dev` does; the refusals that need no server
are in tests/unit/test_cli_dev.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from devstack import free_port
from tests.integration.support import PG_BINARIES

REPO = Path(__file__).resolve().parents[2]
READY = "Ctrl-C stops everything."


def test_up_without_demo_data_says_so_instead_of_a_sample(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRS_", "PG"))}
    log = tmp_path / "up.out"
    with log.open("w") as out:
        up = subprocess.Popen([sys.executable, "-m", "devstack.cli", "up", "--customers", "0", "--shards", "1",
                               "--workers", "1", "--port", str(free_port()), "--pg-binaries", PG_BINARIES],
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while READY not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
    text = log.read_text()
    assert code == 0 and "Traceback" not in text, text
    assert "No demo data (--customers 0): no sample lookup to print" in text
    assert "ResolveCard(" not in text and "--demo" in text and "Try:" not in text
    assert "crs import customers" in text and "crs-dev: stopping" in text
