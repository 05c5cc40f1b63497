"""Locust headless against the embedded stack, briefly: the scenarios make requests, expected
NOT_FOUND / INVALID_ARGUMENT answers are reported as their own successes, and an outcome other than
the expected one is a failure that names its gRPC status. Each run is bounded by --run-time and a
subprocess timeout; everything listens on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.environment import NodeProcess
from loadtests.shared.latency import Timeline
from loadtests.shared.paths import LOCUSTFILE
from tests.integration.support import own_env

REPO = Path(__file__).resolve().parents[2]
CUSTOMERS = 200


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    env = own_env(shards=1, customers=CUSTOMERS)
    with open(os.devnull, "w") as quiet:
        env.start(out=quiet)
    try:
        yield env.start_node(workers=1)
    finally:
        env.stop()


def locust(out: Path, *args: str, seconds: int) -> tuple[subprocess.CompletedProcess[str], list[dict[str, str]],
                                                          list[dict[str, str]], Timeline]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-t", f"{seconds}s", "--csv", str(out / "crs"), "--crs-record", str(out / "rec"), "--only-summary",
           "--loglevel", "WARNING", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds + 90)
    with (out / "crs_stats.csv").open() as f:
        stats = list(csv.DictReader(f))
    with (out / "crs_failures.csv").open() as f:
        failures = list(csv.DictReader(f))
    timeline = Timeline()
    for path in (out / "rec").glob("timeline-*.json"):
        timeline.merge(Timeline.from_json(json.loads(path.read_text())))
    return proc, stats, failures, timeline


def test_every_scenario_runs_and_only_intended_errors_occur(node: NodeProcess, tmp_path: Path) -> None:
    proc, stats, failures, timeline = locust(
        tmp_path, "--host", node.address, "-u", "6", "-r", "6", "--crs-customers", str(CUSTOMERS),
        "--crs-mix", "retail=40,ach=15,customer=15,batch=15,stream=15", "--crs-unknown", "0.05",
        "--crs-malformed", "0.05", "--crs-batch-min", "20", "--crs-batch-max", "60", "--crs-stream-keys", "40",
        seconds=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["Name"]: r for r in stats if r["Name"] != "Aggregated"}
    total = next(r for r in stats if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 200
    assert int(total["Failure Count"]) == 0, failures
    assert failures == []
    for name in ("ResolveCard pan", "ResolveCard token", "ResolveAccount", "GetCustomer", "BatchResolve"):
        assert int(rows[name]["Request Count"]) > 0, name
    assert any(n.startswith("StreamResolve ") for n in rows)
    # the intended error paths ran, under their own names, as successes
    assert any(n.endswith("[INVALID_ARGUMENT]") and int(r["Request Count"]) > 0 for n, r in rows.items())
    assert any(n.endswith("[NOT_FOUND]") and int(r["Request Count"]) > 0 for n, r in rows.items())
    assert all(n.endswith(("[INVALID_ARGUMENT]", "[NOT_FOUND]")) or "[" not in n for n in rows)
    window = timeline.everything()
    assert window.failures == 0 and window.expected_errors > 0
    assert window.lookups > window.calls   # batches count every key


def test_an_unexpected_status_is_a_failure_with_its_code(node: NodeProcess, tmp_path: Path) -> None:
    # Aim at ten times the data set that was loaded: most "known" keys now answer NOT_FOUND unexpectedly.
    proc, stats, failures, timeline = locust(
        tmp_path, "--host", node.address, "-u", "2", "-r", "2", "--crs-customers", str(CUSTOMERS * 10),
        "--crs-mix", "retail", "--crs-skew", "0", seconds=3)
    assert proc.returncode == 1   # locust exits 1 when requests failed
    total = next(r for r in stats if r["Name"] == "Aggregated")
    assert int(total["Failure Count"]) > 0
    assert any("GrpcStatus(NOT_FOUND)" in f["Error"] for f in failures), failures
    assert timeline.everything().failure_kinds.get("NOT_FOUND", 0) > 0


def test_one_command_against_the_embedded_stack(tmp_path: Path) -> None:
    proc, stats, failures, _ = locust(tmp_path, "--crs-embedded", "100", "--crs-embedded-shards", "1",
                                      "--crs-embedded-tls", "-u", "2",
                                      "-r", "2", "--crs-mix", "retail=3,ach=1", seconds=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded stack ready at 127.0.0.1:" in proc.stderr
    total = next(r for r in stats if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, failures
