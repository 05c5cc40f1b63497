"""`crs keys` refuses a rotation batch it cannot make progress with, while parsing (exit 2), before
PostgreSQL: no servers, PostgreSQL is a loopback port that refuses connections (exit 3 if reached)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.crypto import encode_key, generate_keys, new_key

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("batch", ["0", "-5", "x"])
def test_a_rotation_batch_below_one_is_bad_usage(closed_dsn: str, batch: str) -> None:
    """--batch 0 took no row per batch and said "re-fingerprinted 0 cards ... with version 2", exit 0,
    every row still without the new fingerprint: the runbook's next step (nodes on the new version)
    would then find no card. --batch -5 was PostgreSQL's LIMIT error, exit 3 (an outage)."""
    keys = generate_keys()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRS_", "PG"))} | keys | {
        "CRS_PG_DSN": closed_dsn, "CRS_FINGERPRINT_KEY_VERSION": "1",
        "CRS_FINGERPRINT_KEYS": f"{keys['CRS_FINGERPRINT_KEYS']},2:{encode_key(new_key())}"}
    r = subprocess.run([sys.executable, "-m", "server.cli", "keys", "rotate-fingerprint", "--to", "2",
                        "--batch", batch], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--batch" in r.stderr and "Traceback" not in r.stderr, r.stderr
