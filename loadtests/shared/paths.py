"""Where the load tests read and write in the repository."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS_DIR = REPO / "docs" / "benchmarks"          # the benchmark's latest.json / latest.md
SWEEP_DIR = BENCHMARKS_DIR / "sweep"                    # the committed sweep report; the capacity model reads it
SWEEP_REPORT = SWEEP_DIR / "sweep.json"
LOCUSTFILE = REPO / "loadtests" / "scenarios" / "locustfile.py"
