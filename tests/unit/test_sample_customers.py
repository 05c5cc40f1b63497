"""`crs-dev sample-customers` (devstack/sample.py): --dirty breaks rows even in a small file (4% of 30
rows used to round to none), and an OUT it cannot write is one line, not a traceback."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from devstack.cli import main as crs_dev
from devstack.sample import DIRTY_KINDS, MIN_DIRTY_ROWS, dirty_rows, write_sample
from server.cli.import_files import CUSTOMER_COLUMNS


@pytest.mark.parametrize("rows", [MIN_DIRTY_ROWS, 30, 200])
def test_dirty_breaks_at_least_one_row_of_a_small_file(tmp_path: Path, rows: int) -> None:
    out = tmp_path / "sample.csv"
    counts = write_sample(out, rows, dirty=True, seed=rows)
    broken = sum(counts.get(kind, 0) for kind in DIRTY_KINDS)
    assert broken == max(1, round(rows * 0.04))
    assert counts["people"] + counts["duplicates"] + broken == rows
    with open(out, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(CUSTOMER_COLUMNS) and len(lines) == rows + 1
    assert lines[1][0] == "C00000000" and len(lines[1]) == len(CUSTOMER_COLUMNS)   # the first row is never broken
    if rows == 200:
        assert {k for k in DIRTY_KINDS if counts.get(k)} == set(DIRTY_KINDS)     # 8 dirty rows, one of each kind


def test_no_dirty_rows_without_dirty_or_below_the_minimum(tmp_path: Path) -> None:
    assert dirty_rows(MIN_DIRTY_ROWS - 1, random.Random(1)) == {}
    counts = write_sample(tmp_path / "clean.csv", 30, seed=1)
    assert set(counts) == {"people", "duplicates"} and sum(counts.values()) == 30


def test_an_out_it_cannot_write_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert crs_dev(["sample-customers", "/nonexistent/x.csv", "--rows", "3"]) == 1
    err = capsys.readouterr().err
    assert err == "crs-dev: cannot write /nonexistent/x.csv: No such file or directory\n"
