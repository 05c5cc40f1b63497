"""`crs bins` without servers: what it does with bad input and with a PostgreSQL it cannot reach
(`crs --help`: exit 2 for bad usage, 3 for a dependency down; one line on stderr, never a traceback),
where it takes a card number (standard input only), and duplicate ranges in a file.

Every PAN here is made up in the reserved test range 999xxx."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.bins import CARD_NUMBER, COLUMNS, BinRowError, parse_row
from server.cli.base import CommandFailed
from server.cli.bins import duplicates, lookup_digits
from server.pan import luhn_check_digit

ROOT = Path(__file__).resolve().parents[2]
PAN = "999150123456789" + luhn_check_digit("999150123456789")
BAD_LUHN = PAN[:-1] + str((int(PAN[-1]) + 1) % 10)
ROW = ["999100", "999199", "16", "testnet", "Test Issuer A", "US", "credit", "false"]


def _crs(dsn: str, *args: str, stdin: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | {"CRS_PG_DSN": dsn}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert PAN not in r.stdout + r.stderr and BAD_LUHN not in r.stdout + r.stderr
    return r.stderr


@pytest.mark.parametrize("args, stdin, said", [
    (("lookup", PAN), "", "standard input"),             # a full PAN on the command line: never
    (("lookup", BAD_LUHN), "", "standard input"),
    (("lookup", "12345678901234"), "", "standard input"),
    (("lookup", "abc123"), "", "6-11 ASCII digits"),
    (("lookup", "1234"), "", "6-11 ASCII digits"),        # too short to be a BIN
    (("lookup", "９９９１５０"), "", "6-11 ASCII digits"),   # fullwidth digits
    (("lookup",), BAD_LUHN + "\n", "Luhn"),               # the PAN on stdin is still checked
    (("lookup",), "\n", "empty"),
    (("import", "no-such-file.csv"), "", "no-such-file.csv"),
])
def test_bad_usage_is_exit_2_in_one_line(closed_dsn: str, args: tuple[str, ...], stdin: str, said: str) -> None:
    r = _crs(closed_dsn, "bins", *args, stdin=stdin)
    assert r.returncode == 2 and said in _one_line(r)


@pytest.mark.parametrize("args, stdin", [
    (("lookup", "999150"), ""), (("lookup",), PAN + "\n"), (("versions",), ""), (("activate", "999"), "")])
def test_postgresql_unreachable_is_exit_3_in_one_line(closed_dsn: str, args: tuple[str, ...], stdin: str) -> None:
    r = _crs(closed_dsn, "bins", *args, stdin=stdin)
    assert r.returncode == 3 and "PostgreSQL unavailable" in _one_line(r)


def test_lookup_digits() -> None:
    assert lookup_digits("999150", lambda: "") == ("999150", "999150")
    assert lookup_digits("99915012345", lambda: "") == ("99915012345", "99915012345")
    assert lookup_digits(None, lambda: PAN) == (PAN, "999150******" + PAN[-4:])
    for bad in ("99915", "999150123456", "", " 999150", "99915a"):
        with pytest.raises(CommandFailed) as info:
            lookup_digits(bad, lambda: "")
        assert info.value.code == 2


def _rows(*rows: list[str]) -> tuple[list[object], list[int]]:
    return [parse_row(dict(zip(COLUMNS, r, strict=True))) for r in rows], list(range(2, 2 + len(rows)))


def test_identical_rows_collapse_and_conflicting_ones_are_named() -> None:
    other = ["999200", "999299", "16", "testnet", "Test Issuer B", "GB", "debit", "true"]
    rows, numbers = _rows(ROW, other, ROW, ["999100", "999199", "16", "testnet", "Dup Two", "FR", "debit", "true"],
                          ["99910000", "99919999", "16", "testnet", "Test Issuer A", "US", "credit", "false"],
                          ["999100", "999199", "16", "TESTNET", "Test Issuer A", "us", "credit", "no"])
    found = duplicates(rows, numbers)
    assert found.kept == rows[:2] and found.kept_numbers == [2, 3]
    assert found.collapsed == [(4, 2), (7, 2)]        # the last one is the same row once normalised
    assert found.conflicts == [(2, 5, ("issuer_name", "issuer_country", "product", "on_us")),
                               (2, 6, ("low", "high"))]   # the same PANs, spelled as an 8-digit range


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return path


def test_a_conflicting_duplicate_refuses_the_file_before_any_database(closed_dsn: str, tmp_path: Path) -> None:
    dup = ["999100", "999199", "16", "testnet", "Dup Two", "FR", "debit", "true"]
    r = _crs(closed_dsn, "bins", "import", str(_write(tmp_path / "dup.csv", [ROW, dup])))
    assert r.returncode == 2 and "1 conflicting duplicates" in _one_line(r)
    assert ("conflicting duplicate: rows 2 and 3 (999100-999199 and 999100-999199) cover the same PANs but differ"
            " in issuer_name, issuer_country, product, on_us") in r.stdout
    assert "overlaps: 0 nested" in r.stdout                 # no longer counted as a nested range


def test_identical_duplicates_are_collapsed_and_said(closed_dsn: str, tmp_path: Path) -> None:
    r = _crs(closed_dsn, "bins", "import", str(_write(tmp_path / "same.csv", [ROW, ROW])))
    assert "duplicates: 1 identical rows collapsed (row 3 = row 2), 0 conflicting" in r.stdout
    assert r.returncode == 3 and "PostgreSQL unavailable" in _one_line(r)   # got as far as storing it


@pytest.mark.parametrize("column, given, stored", [
    ("network", "VISA", "visa"), ("network", " Testnet-Domestic ", "testnet-domestic"),
    ("issuer_country", "zz", "ZZ"), ("issuer_country", "XX", "XX"),
    ("product", "Prepaid", "prepaid"), ("issuer_name", " Banque Égée ", "Banque Égée"),
    ("on_us", "yes", True), ("on_us", "Y", True), ("on_us", "1", True), ("on_us", "TRUE", True),
    ("on_us", "no", False), ("on_us", "n", False), ("on_us", "0", False), ("on_us", "", False),
])
def test_a_cell_is_accepted_and_stored_as_docs_bins_md_says(column: str, given: str, stored: object) -> None:
    row = parse_row(dict(zip(COLUMNS, ROW, strict=True)) | {column: given})
    assert getattr(row, column) == stored


@pytest.mark.parametrize("column, given", [
    ("network", "v"), ("network", "9visa"), ("network", "visa card"), ("network", "v" * 33),
    ("issuer_country", "USA"), ("issuer_country", "U5"), ("issuer_country", "É1"),
    ("on_us", "maybe"), ("on_us", "oui"), ("product", "gold"), ("issuer_name", "a\tb"), ("pan_length", "16.0"),
])
def test_a_cell_outside_docs_bins_md_is_refused(column: str, given: str) -> None:
    with pytest.raises(BinRowError) as info:
        parse_row(dict(zip(COLUMNS, ROW, strict=True)) | {column: given})
    assert info.value.column == column


def test_overlaps_tell_a_sub_range_from_a_partial_overlap_and_from_the_same_range() -> None:
    """server.bins.overlaps: the same PANs twice (even spelled with other prefix lengths) is a
    duplicate, not a nested range: neither is more specific."""
    from server.bins import BinRow, overlaps

    def row(low: str, high: str) -> BinRow:
        return BinRow(low, high, 16, "testnet", "Test Issuer", "US", "credit", False)

    rows = [row("999100", "999199"), row("99912000", "99912999"), row("999150", "999299"),
            row("99910000", "99919999")]
    kinds = {(o.outer, o.inner): (o.nested, o.same) for o in overlaps(rows)}
    assert kinds[(0, 1)] == (True, False)                  # a sub-range
    assert kinds[(0, 2)] == (False, False)                 # a partial overlap
    assert kinds.get((0, 3), kinds.get((3, 0))) == (False, True)   # the same PANs, other spelling


@pytest.mark.parametrize("column, given", [
    ("issuer_name", f"Issuer {PAN}"), ("issuer_name", f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"),
    ("issuer_name", f"{PAN[:4]}-{PAN[4:8]}-{PAN[8:12]}-{PAN[12:]} Bank"), ("network", f"net{PAN}"),
])
def test_a_card_number_in_a_text_cell_is_a_refused_row(column: str, given: str) -> None:
    """ResolveBin answers these cells in clear to every switch: a PAN there would be served (and
    `crs pci scan` would find it in bin_ranges). The reason never holds the number."""
    with pytest.raises(BinRowError) as info:
        parse_row(dict(zip(COLUMNS, ROW, strict=True)) | {column: given})
    assert info.value.column == column and info.value.reason == CARD_NUMBER and PAN not in str(info.value)


@pytest.mark.parametrize("issuer", ["Bank 1234567", "Caisse 2024-01-15", f"Issuer {BAD_LUHN}"])
def test_digits_that_are_no_card_number_stay(issuer: str) -> None:
    assert parse_row(dict(zip(COLUMNS, ROW, strict=True)) | {"issuer_name": issuer}).issuer_name == issuer


def test_an_import_names_the_rows_holding_a_card_number_never_the_number(closed_dsn: str, tmp_path: Path) -> None:
    rows = [ROW, [*ROW[:4], f"Issuer {PAN}", *ROW[5:]], ["999200", "999299", "16", f"v{PAN}", *ROW[4:]]]
    rejects = tmp_path / "rejects.csv"
    r = _crs(closed_dsn, "bins", "import", str(_write(tmp_path / "pan.csv", rows)), "--rejects", str(rejects))
    assert r.returncode == 2 and "2 rejected rows > --max-rejects 0" in _one_line(r)
    assert "card number: row 3, issuer_name: rejected" in r.stdout and "card number: row 4, network" in r.stdout
    assert PAN not in rejects.read_text() and "3,issuer_name,holds a card number" in rejects.read_text()
    allowed = _crs(closed_dsn, "bins", "import", str(tmp_path / "pan.csv"), "--max-rejects", "2")
    assert allowed.returncode == 3 and "card number: row 3" in allowed.stdout   # the good row went on to the database
    assert PAN not in allowed.stdout + allowed.stderr


def test_import_help_says_what_is_refused() -> None:
    r = subprocess.run([sys.executable, "-m", "server.cli", "bins", "import", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert "--allow-shrink" in r.stdout and "card" in r.stdout and "under half the active table" in r.stdout


def test_a_header_naming_a_column_twice_is_refused(closed_dsn: str, tmp_path: Path) -> None:
    """The later of two `network` columns won silently (mastercard for a visa row)."""
    path = tmp_path / "twice.csv"
    path.write_text(",".join([*COLUMNS, "network"]) + "\n" + ",".join([*ROW, "othernet"]) + "\n")
    r = _crs(closed_dsn, "bins", "import", str(path))
    assert r.returncode == 2 and "column network appears twice in the header" in _one_line(r)


def test_rejects_naming_the_input_is_refused_before_it_is_truncated(closed_dsn: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "bins.csv", [ROW])
    before = path.read_text()
    r = _crs(closed_dsn, "bins", "import", str(path), "--rejects", str(path))
    assert r.returncode == 2 and "is the input file" in _one_line(r) and path.read_text() == before


def test_an_unreadable_csv_is_exit_2_and_rows_are_numbered_by_line(closed_dsn: str, tmp_path: Path) -> None:
    huge = tmp_path / "huge.csv"
    huge.write_text(",".join(COLUMNS) + "\n" + ",".join(ROW[:4]) + ',"' + "x" * 200_000 + '",US,credit,false\n')
    r = _crs(closed_dsn, "bins", "import", str(huge))
    assert r.returncode == 2 and "not a readable CSV file" in _one_line(r)
    spanning = tmp_path / "spanning.csv"   # a quoted cell over two lines: the next record starts on line 4
    spanning.write_text(",".join(COLUMNS) + "\n" + ",".join(ROW[:4]) + ',"Two\nLines",US,credit,false\n'
                        + ",".join(ROW[:6]) + ",nonsense,false\n")
    rejects = tmp_path / "rejects.csv"
    _crs(closed_dsn, "bins", "import", str(spanning), "--rejects", str(rejects))
    assert [r[:2] for r in list(csv.reader(rejects.open()))[1:]] == [["2", "issuer_name"], ["4", "product"]]
