"""The scaling sweep end to end, small: a paced 1 -> 2 node sweep on its own embedded stack (200 demo
customers) runs every step (stack, warming, idle window, locust, CPU windows, report) and writes the
report fields the capacity model and the committed report rely on. It asserts what was measured and
written, never how fast or how linear: that is the sweep's own job on a quiet machine."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests.sweep.capacity import costs_from_report
from loadtests.sweep.report import runs_from_report

REPO = Path(__file__).resolve().parents[2]


def test_a_two_size_paced_sweep_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "loadtests.sweep", "--nodes", "1,2", "--shards", "1", "--node-mode", "processes",
           "--per-node-rate", "40", "--users-per-node", "2", "--customers", "200", "--calibrate", "none",
           "--no-light", "--seconds", "2", "--warmup", "1", "--idle-seconds", "1", "--locust-workers", "1",
           "--out", str(out), "--note", "integration test"]
    # Its TMPDIR, where its temporary artifacts directory goes and must go from. Not under tmp_path:
    # the embedded PostgreSQL (run as 'nobody' when we are root) must traverse it.
    tmp = Path(tempfile.mkdtemp(prefix="crs-sweep-test-"))
    tmp.chmod(0o755)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                              env=os.environ | {"TMPDIR": str(tmp)})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "artifacts in " + str(tmp) in proc.stderr + proc.stdout
        assert not list(tmp.glob("crs-sweep-*")), "the temporary artifacts directory is removed"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report = json.loads((out / "sweep.json").read_text())
    assert report["notes"] == ["integration test"] and set(report["verdicts"]) == {"nodes"}
    runs = runs_from_report(report)
    sweep = [r for r in runs if r.label == "sweep"]
    assert [(r.series, r.nodes, r.shards) for r in sweep] == [("nodes", 1, 1), ("nodes", 2, 1)]
    for r, d in zip(sweep, [d for d in report["runs"] if d["label"] == "sweep"], strict=True):
        assert r.users == 2 * r.nodes and r.offered_calls_per_s == 40 * r.nodes   # same load and users per node
        assert r.lookups > 0 and r.failures == 0
        assert r.node_cpu_s > 0 and r.redis_cpu_s > 0 and r.pg_cpu_s >= 0
        assert r.idle_s >= 1 and r.node_idle_cpu_s > 0 and r.started_at > 0
        assert r.redis_commands > 0 and r.redis_reads > 0     # Redis's own counters over the window
        assert d["derived"]["verdict"] in ("PASS", "FAIL")
        for key in ("node_cpu_per_1k", "redis_cpu_per_1k", "pg_cpu_per_1k", "cpu_ratio", "redis_cpu_ratio",
                    "pg_cpu_ratio", "node_idle_cores", "node_load_cpu_per_1k"):
            assert key in d["derived"], key
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [row["series"] for row in rows if row["label"] == "sweep"] == ["nodes", "nodes"]
    readme = (out / "README.md").read_text()
    assert "## Nodes grow, 1 shard(s) fixed" in readme and "integration test" in readme
    costs = costs_from_report(report)        # the capacity model reads what the sweep wrote
    assert costs.scenarios["retail"].node_cpu_s > 0 and costs.scaling_penalty >= 1


def test_an_interrupted_sweep_reports_the_windows_it_measured(tmp_path: Path) -> None:
    """SIGTERM (a device call's `timeout`) after the first window: the report holds that window and
    says the sweep was interrupted; exit 130. It used to write nothing."""
    import signal
    import time

    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "loadtests.sweep", "--nodes", "1,2", "--shards", "1", "--node-mode", "processes",
           "--per-node-rate", "40", "--users-per-node", "2", "--customers", "200", "--calibrate", "none",
           "--no-light", "--seconds", "2", "--warmup", "1", "--idle-seconds", "0", "--locust-workers", "1",
           "--out", str(out)]
    tmp = Path(tempfile.mkdtemp(prefix="crs-sweep-test-"))
    tmp.chmod(0o755)
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=os.environ | {"TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        for line in proc.stdout:   # the first window's summary, then the second window starts
            if line.startswith("[2/2]") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=180)   # a hung clean-up fails the test instead of hanging CI
        assert proc.returncode == 130, rest[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    report = json.loads((out / "sweep.json").read_text())
    assert [(r.nodes, r.label) for r in runs_from_report(report)] == [(1, "sweep")]
    assert any(n.startswith("Interrupted after 1 of 2 windows") for n in report["notes"])
    assert "Interrupted after 1 of 2 windows" in (out / "README.md").read_text()
