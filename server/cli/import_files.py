"""The source files of `crs import`: reading a CSV row by row, validating each row, and the rejects
and report files (docs/identity.md, "Bulk import").

A row that cannot be used is never fatal: it becomes a line of the rejects file (row, column, reason,
and the offending cell's *shape*: letters as x, digits as 9, so an operator can see what kind of
value it was without the value itself). Nothing from a cell is ever written anywhere in clear: not
to the rejects file, the report, the logs or the terminal. Every row read is either accepted or
rejected, and the counts say so.

A row's number is the line on which its record starts, as an editor numbers lines (the header is
line 1): that is where an operator looks for it. It is a spreadsheet's row number too unless a quoted
cell spans lines: each of its lines counts, so the rows after it are numbered further on. A record
the file breaks (a quote opened and never closed) is one rejected row however many lines it covers,
and its reason names them, so that `rows read = accepted + rejected` holds and nothing is lost unsaid.
Header names are matched ignoring case and surrounding spaces (` Given_Name` is `given_name`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from server.cli.base import CommandFailed
from server.identity.attributes import AttributeProblem, has_name, parse_identity, parse_source_ref
from server.identity.blocking import blocking_keys
from server.store.bulk import ImportRow

CUSTOMER_COLUMNS = ("source_ref", "given_name", "family_name", "date_of_birth", "national_id", "national_id_type",
                    "address_line1", "address_line2", "locality", "postcode", "region", "country", "phone", "email")
ACCOUNT_COLUMNS = ("source_ref", "customer_source_ref", "routing_number", "account_number", "type", "currency")
CARD_COLUMNS = ("source_ref", "routing_number", "account_number", "pan", "expiry")
MAX_CELL = 1000           # a longer cell is a broken file (e.g. an unbalanced quote), not a value
_NUL = "\ue000"           # what a NUL byte is read as (the csv module refuses NUL itself)
ROW = "(row)"             # the column of a problem with the whole row
REJECT_COLUMNS = ("row", "column", "reason", "shape")
_SHAPE_KEEP = set(" -/.@'+,()#:_")
_BAD_BYTE = re.compile("[\udc80-\udcff]")   # how surrogateescape reads a byte that is not UTF-8


@dataclass(frozen=True)
class Reject:
    row: int
    column: str
    reason: str
    shape: str = ""


def shape(value: str, limit: int = 24) -> str:
    """What kind of value a cell held, never the value: 'AB12-x' -> 'XX99-x (6 chars)'."""
    out = []
    for c in value[:limit]:
        if c.isdigit():
            out.append("9")
        elif c.isalpha():
            out.append("X" if c.isupper() else "x")
        elif c in _SHAPE_KEEP:
            out.append(c)
        else:
            out.append("?")
    return "".join(out) + ("..." if len(value) > limit else "") + f" ({len(value)} chars)"


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 of the file's bytes and its number of lines (the progress bar's total)."""
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            lines += chunk.count(b"\n")
    return digest.hexdigest(), lines


def output_problem(source: Path, report: Path, rejects: Path | None) -> str | None:
    """Why --report or --rejects cannot be written, found before anything is opened: an output that is
    the input (by another name, a link, a symlink) would be truncated before the input is read, and
    one in a missing directory would fail after the import began."""
    outputs = [("--report", report)] + ([("--rejects", rejects)] if rejects else [])
    for flag, out in outputs:
        if same_file(out, source):
            return f"{flag} {out} is the input file"
    if rejects and same_file(report, rejects):
        return f"--report and --rejects are the same file ({report})"
    for flag, out in outputs:
        if out.is_dir():
            return f"{flag} {out} is a directory"
        if not out.parent.is_dir():
            return f"{flag} {out}: no directory {out.parent}"
        if not os.access(out if out.exists() else out.parent, os.W_OK):
            return f"{flag} {out}: permission denied"
    return None


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:      # one does not exist (yet): the same path once symlinks and ".." are resolved
        return a.resolve() == b.resolve()


class SourceFile:
    """A CSV source file with a header row naming `columns` (in any order, each exactly once)."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, tuple(columns)
        self.rows_read = 0
        self.unread: tuple[int, int] | None = None   # lines from a never-closed quote to the end of the file

    def header_problems(self, header: list[str]) -> list[Reject]:
        problems = []
        seen: set[str] = set()
        for name in header:
            clean = name.strip().lower()
            if clean in seen:
                problems.append(Reject(1, _column_name(clean), "column appears twice in the header"))
            elif clean not in self.columns:
                problems.append(Reject(1, "(header)", f"unknown column {_column_name(clean)}; expected"
                                                      f" {', '.join(self.columns)} (is the header row missing?)"))
            seen.add(clean)
        problems += [Reject(1, c, "missing from the header") for c in self.columns if c not in seen]
        return problems

    def read(self) -> Iterator[tuple[int, dict[str, str] | Reject]]:
        """(row, cells by column) per data row, or (row, Reject); a bad header raises HeaderError."""
        with open(self.path, "rb") as raw:
            # utf-8-sig: a BOM before a quoted header name made it read as '"source_ref"'.
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
            yield from self._rows(text)

    def _rows(self, text: IO[str]) -> Iterator[tuple[int, dict[str, str] | Reject]]:
        lines = _Lines(text)
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            raise HeaderError([Reject(1, "(header)", "the file has no header row")]) from None
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        problems = self.header_problems(header)
        if problems:
            raise HeaderError(problems)
        names = [h.strip().lower() for h in header]
        start = reader.line_num + 1                  # the line the next record starts on
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                end = reader.line_num
                self.rows_read += 1
                if lines.ended:
                    self.unread = (start, end)
                yield start, Reject(start, ROW, _broken(exc, start, end, lines.ended))
                start = end + 1
                continue
            row, start = start, reader.line_num + 1
            self.rows_read += 1
            checked = self._check(row, names, cells)
            if isinstance(checked, Reject) and start - 1 > row:     # e.g. a quote closed many lines later
                checked = replace(checked, reason=f"{checked.reason} (the record spans lines {row}-{start - 1})")
            yield row, checked

    @staticmethod
    def _check(row: int, names: list[str], cells: list[str]) -> dict[str, str] | Reject:
        if not cells or (all(not c.strip() for c in cells) and len(cells) <= 1):
            return Reject(row, ROW, "is empty")
        if len(cells) != len(names):
            return Reject(row, ROW, f"has {len(cells)} columns; the header has {len(names)}")
        for name, cell in zip(names, cells, strict=True):
            if not cell.isascii() and _BAD_BYTE.search(cell):
                return Reject(row, name, "is not valid UTF-8", shape(cell))
            if _NUL in cell:
                return Reject(row, name, "contains a NUL byte", shape(cell))
            if len(cell) > MAX_CELL:
                return Reject(row, name, f"is longer than {MAX_CELL} characters", shape(cell))
        return dict(zip(names, cells, strict=True))


class HeaderError(Exception):
    def __init__(self, problems: list[Reject]) -> None:
        super().__init__("; ".join(f"{p.column}: {p.reason}" for p in problems))
        self.problems = problems


class _Lines:
    """The file's lines for the csv module (a NUL byte read as _NUL); `ended` once it asked past the
    last one, which in the middle of a record means a quote that is never closed."""

    def __init__(self, text: IO[str]) -> None:
        self.text, self.ended = text, False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.text.readline()
        if not line:
            self.ended = True
            raise StopIteration
        return line.replace("\0", _NUL)


def _broken(exc: csv.Error, start: int, end: int, at_end: bool) -> str:
    """The reason of a record that is not CSV, naming every line it took with it."""
    if at_end and end > start:
        return (f"is not valid CSV: a quote opened on this line is never closed, so lines {start}-{end}"
                " (to the end of the file) could not be read")
    if at_end:
        return "is not valid CSV: a quote opened on this line, the file's last, is never closed"
    spans = f"; the record spans lines {start}-{end}, none of them loaded" if end > start else ""
    return f"is not valid CSV ({_csv_reason(exc)}){spans}"


_COLUMN_NAME = re.compile(r"[a-z][a-z_ ]{0,39}")


def _column_name(clean: str) -> str:
    """A header cell as a message may show it: quoted when it reads as a column name (letters, spaces,
    underscores), else only its shape. A file without its header row has data in the first line — a
    card number, a national id, a birth date — and the "unknown column" reason went to the terminal
    and the rejects file in clear."""
    return repr(clean) if _COLUMN_NAME.fullmatch(clean) else f"shaped {shape(clean)}"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and not "\udc80" <= c <= "\udcff" else "?" for c in text)[:40]


def _csv_reason(exc: csv.Error) -> str:
    # The csv module's messages name the problem, never the cell ("',' expected after '\"'").
    return _printable(str(exc))


class SeenKeys:
    """Source keys this file's rows have taken: a later row with one is rejected. A row takes its key
    only once it is accepted (`take`), so a rejected row leaves it to a corrected row further down."""

    def __init__(self) -> None:
        self.first: dict[str, int] = {}

    def check(self, row: int, key: str, column: str = "source_ref") -> Reject | None:
        first = self.first.get(key, row)
        return None if first == row else Reject(row, column, f"duplicates the source_ref of row {first}")

    def take(self, row: int, key: str) -> None:
        self.first.setdefault(key, row)


def source_key(row: int, value: str, column: str = "source_ref") -> str | Reject:
    """A source key of the run's system, or why it is unusable."""
    try:
        return parse_source_ref("import", value).key
    except AttributeProblem as problem:
        reason = "is empty" if not value else problem.reason
        return Reject(row, column, reason, shape(value))


def customer_row(row: int, cells: dict[str, str], seen: SeenKeys) -> ImportRow | Reject:
    """Validate one customer row: a source_ref and a name are required, every other attribute is
    optional (a bad one is dropped and listed as a warning)."""
    key = source_key(row, cells["source_ref"])
    if isinstance(key, Reject):
        return key
    duplicate = seen.check(row, key)
    if duplicate:
        return duplicate
    identity, problems = parse_identity(cells, strict=False)
    warnings = tuple(f"{p.field}: {p.reason}" for p in problems)
    if not has_name(identity):
        why = "; ".join(w for w in warnings if w.startswith(("given_name", "family_name")))
        return Reject(row, "given_name,family_name", "no usable name" + (f" ({why})" if why else ""))
    seen.take(row, key)
    return ImportRow(row, key, identity, warnings, tuple(blocking_keys(identity)))


class Rejects:
    """The rejects file (written as rows are read; `count` of them)."""

    def __init__(self, path: Path | None) -> None:
        self.count = 0
        try:
            self.file = open(path, "w", newline="", encoding="utf-8") if path else None
        except OSError as exc:      # checked before (output_problem): changed since
            raise CommandFailed(f"cannot write --rejects {path}: {exc.strerror}") from exc
        self.writer = csv.writer(self.file, lineterminator="\n") if self.file else None
        if self.writer:
            self.writer.writerow(REJECT_COLUMNS)

    def add(self, reject: Reject) -> None:
        self.count += 1
        if self.writer:
            self.writer.writerow((reject.row, reject.column, reject.reason, reject.shape))

    def close(self) -> None:
        if self.file:
            self.file.close()
