"""Reading an import's source file (server/cli/import_files.py), no servers: rows are numbered by the
line their record starts on, a never-closed quote is one rejected row naming every line it took,
and header names are matched ignoring case and surrounding spaces."""

from __future__ import annotations

from pathlib import Path

from server.cli.import_files import CUSTOMER_COLUMNS, Reject, SourceFile
from server.cli.imports import Summary

HEADER = ",".join(CUSTOMER_COLUMNS)
FILLER = "," * (len(CUSTOMER_COLUMNS) - 3)      # the empty cells after source_ref, given_name, family_name


def _read(tmp_path: Path, text: str) -> tuple[SourceFile, list[tuple[int, dict[str, str] | Reject]]]:
    path = tmp_path / "in.csv"
    path.write_text(text, encoding="utf-8")
    source = SourceFile(path, CUSTOMER_COLUMNS)
    return source, list(source.read())


def test_rows_are_numbered_by_the_line_their_record_starts_on(tmp_path: Path) -> None:
    cells = ["R2", "Bea", "Kim"] + [""] * (len(CUSTOMER_COLUMNS) - 3)
    cells[CUSTOMER_COLUMNS.index("address_line2")] = '"Flat 2\nthe Old Mill"'
    source, rows = _read(tmp_path, "\n".join([
        HEADER,                                   # line 1
        "R1,Ann,Lee" + FILLER,                    # line 2
        ",".join(cells),                          # lines 3-4: a quoted cell spanning two lines
        "R3,Cal,Ng" + FILLER + ",extra",          # line 5: one cell too many
        "R4,Dee,Ortiz" + FILLER,                  # line 6
    ]) + "\n")
    assert [row for row, _ in rows] == [2, 3, 5, 6]
    assert isinstance(rows[1][1], dict) and rows[1][1]["address_line2"] == "Flat 2\nthe Old Mill"
    assert isinstance(rows[2][1], Reject) and rows[2][1].row == 5 and "15 columns" in rows[2][1].reason
    assert source.rows_read == 4 and source.unread is None


def test_a_quote_never_closed_is_one_rejected_row_naming_the_lines_it_took(tmp_path: Path) -> None:
    """The verifier's file: header and six rows, row 4 opening a quote it never closes. Rows 5-7 used
    to vanish from every count; the reject now names lines 4-7, and the summary says so too."""
    lines = [HEADER] + [f"R{n},Ann,Lee{chr(96 + n)}" + FILLER for n in range(2, 8)]
    lines[3] = '"open quote, never closed' + FILLER
    source, rows = _read(tmp_path, "\n".join(lines) + "\n")
    assert [row for row, _ in rows] == [2, 3, 4]
    broken = rows[2][1]
    assert isinstance(broken, Reject) and (broken.row, broken.column) == (4, "(row)")
    assert "a quote opened on this line is never closed" in broken.reason
    assert "lines 4-7 (to the end of the file) could not be read" in broken.reason
    assert source.rows_read == 3 and source.unread == (4, 7)
    summary = Summary()
    summary.read, summary.rejected, summary.unread = 3, 1, source.unread
    summary.decisions["new"] = 2
    assert summary.line("customers") == ("customers: 3 rows read, 2 accepted (new 2), 1 rejected; lines 4-7 are"
                                         " one rejected row: a quote opened on line 4 is never closed")


def test_a_quote_on_the_last_line_and_a_quote_closed_lines_later(tmp_path: Path) -> None:
    _, rows = _read(tmp_path, HEADER + "\nR1,Ann,Lee" + FILLER + '\n"R2,Bea' + FILLER + "\n")
    assert rows[1][0] == 3 and isinstance(rows[1][1], Reject)
    assert "a quote opened on this line, the file's last, is never closed" in rows[1][1].reason
    # An unbalanced quote that a later row's quote closes: one row over lines 2-4, refused, its lines named.
    _, rows = _read(tmp_path, HEADER + '\nR1,"Ann' + FILLER + "\nR2,Bea" + FILLER + '\nR3,Cal",Lee,x' + FILLER
                    + "\nR4,Dee,Ortiz" + FILLER + "\n")
    assert [row for row, _ in rows] == [2, 5]
    assert isinstance(rows[0][1], Reject) and "the record spans lines 2-4" in rows[0][1].reason
    assert isinstance(rows[1][1], dict) and rows[1][1]["source_ref"] == "R4"


def test_header_names_ignore_case_and_surrounding_spaces(tmp_path: Path) -> None:
    header = HEADER.replace("given_name", " Given_Name").replace("email", "EMAIL ")
    _, rows = _read(tmp_path, header + "\nR1,Ann,Lee" + FILLER + "\n")
    assert rows == [(2, dict.fromkeys(CUSTOMER_COLUMNS, "") | {"source_ref": "R1", "given_name": "Ann",
                                                                 "family_name": "Lee"})]
