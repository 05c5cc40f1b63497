"""`crs import customers|accounts|cards` on the real stack (PostgreSQL, Redis, a node), run in-process
through the `crs` parser: every kind of bad row is rejected or warned about with its row, column and
reason and never with its value; counts add up; duplicates inside a file become one customer; a row
of a customer created through gRPC joins it; a re-run creates nothing; an interrupted run resumes;
the feed and the outbox carry the events; imported accounts and cards resolve through a node."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from devstack.environment import DevEnvironment
from server.cli import import_reader
from server.cli.import_files import CUSTOMER_COLUMNS
from server.cli.main import main as crs
from server.identity.attributes import CARD_NUMBER
from server.pan import luhn_check_digit
from server.proto import crs_pb2 as pb
from server.store.bulk import BulkCustomers
from tests.integration.support import Clients, UsedSecrets, expect_code, fresh_account_number, fresh_pan, sql
from tests.sigint import with_sigint_ignored

HEADER = ",".join(CUSTOMER_COLUMNS)
ROOT = Path(__file__).resolve().parents[2]
# `crs import` in a child whose third batch write waits to be interrupted (two batches committed).
SIGINT_ROWS = 3000
HOLD_THIRD_WRITE = """
import asyncio, signal, sys
from server.cli import import_reader
from server.cli.main import main
from server.store.bulk import BulkCustomers
print("sigint ignored" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "sigint handled", flush=True)
if sys.argv[1] == "process":
    import_reader.PROCESS_READER_ROWS = 1
real, calls = BulkCustomers.write, 0
async def write(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == 3:
        print("holding", flush=True)
        await asyncio.sleep(120)
    return await real(self, *args, **kwargs)
BulkCustomers.write = write
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def env_vars(dev_env: DevEnvironment, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k, v in dev_env.keys.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CRS_PG_DSN", dev_env.operator_dsn)
    monkeypatch.setenv("CRS_REDIS_SHARDS", ",".join(f"{n}={u}" for n, u in dev_env.shard_urls().items()))
    yield


def _sql(env: DevEnvironment, query: str, *args: Any) -> list[asyncpg.Record]:
    return sql(env.admin_dsn, query, *args)


_DOBS_GIVEN: set[tuple[int, frozenset[int]]] = set()


def _dob(used: UsedSecrets, *, fresh: bool = True) -> str:
    """A date of birth; day and month both 1-12 and different, so a day/month swap is a date too.
    `fresh`: one no other row of the session has, nor its swap. The tests share one database, and two
    people with the same given name, a like family name and one birthday match (0.9999): a later
    test's person joined an earlier one's (a CI failure). Bulk rows (thousands) take any date."""
    for _ in range(10_000):
        year, (month, day) = random.randint(1935, 2003), random.sample(range(1, 13), 2)
        if not fresh or (year, frozenset((month, day))) not in _DOBS_GIVEN:
            break
    else:
        raise AssertionError(f"no fresh date of birth left after {len(_DOBS_GIVEN)}: use fresh=False for bulk rows")
    if fresh:
        _DOBS_GIVEN.add((year, frozenset((month, day))))
    dob = f"{year}-{month:02d}-{day:02d}"
    used.identity.add(dob)
    return dob


def _ssn(used: UsedSecrets) -> str:
    ssn = f"{random.randint(1, 665):03d}-{random.randint(1, 99):02d}-{random.randint(1, 9999):04d}"
    used.identity.add(ssn.replace("-", ""))
    return ssn


def _row(used: UsedSecrets, ref: str, *, bulk: bool = False, **over: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:6]
    row = {c: "" for c in CUSTOMER_COLUMNS}
    # Letters only: names lose their digits when normalised, and the tests share one database, so a
    # hex tag made many customers "theodora vasquez" (a later test's person then matched an earlier one's).
    # The tag leads: behind a shared "Vasquez" two rows' family names were alike enough (Jaro-Winkler)
    # to make different people possible matches; in front they score as different names.
    family = tag.translate(str.maketrans("0123456789", "ghijklmnop")).capitalize() + "vasquez"
    row.update(source_ref=ref, given_name="Theodora", family_name=family, date_of_birth=_dob(used, fresh=not bulk),
               address_line1=f"{random.randint(1, 9999)} Orchard Lane", locality="Springfield",
               postcode=f"{random.randint(10000, 99999)}", country="US", email=f"tv{tag}@example.com")
    row.update(over)
    return row


def _line(row: dict[str, str]) -> bytes:
    out = []
    for c in CUSTOMER_COLUMNS:
        v = row[c]
        out.append('"' + v.replace('"', '""') + '"' if any(ch in v for ch in ',"\n') else v)
    return ",".join(out).encode("utf-8", "surrogateescape")


def _write(path: Path, lines: list[bytes], header: bytes = HEADER.encode()) -> Path:
    path.write_bytes(b"\n".join([header, *lines]) + b"\n")
    return path


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _import(tmp: Path, kind: str, file: Path, source: str, *extra: str) -> tuple[int, list[dict[str, str]],
                                                                                 list[dict[str, str]]]:
    report, rejects = tmp / f"{file.stem}-report.csv", tmp / f"{file.stem}-rejects.csv"
    code = crs(["import", kind, str(file), "--source", source, "--report", str(report), "--rejects", str(rejects),
                *extra])
    return code, _read(report) if report.exists() else [], _read(rejects) if rejects.exists() else []


def _bad_sin(used: UsedSecrets) -> str:
    body = f"{random.randint(1, 7)}{random.randint(0, 9999999):07d}"
    good = luhn_check_digit(body)
    sin = body + str((int(good) + 1) % 10)
    used.identity.add(sin)
    return sin


@pytest.fixture(params=["inline", "process"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of reading a customer file: in the importing process, or parsed by a second process
    (what files of import_reader.PROCESS_READER_ROWS lines or more get)."""
    if request.param == "process":
        monkeypatch.setattr(import_reader, "PROCESS_READER_ROWS", 1)
    return str(request.param)


def test_rejects_and_warnings_name_row_column_reason_never_a_value(
        env_vars: None, dev_env: DevEnvironment, used_secrets: UsedSecrets, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], reader: str) -> None:
    system = "dirty-" + uuid.uuid4().hex[:6]
    year = random.randint(1940, 1990)
    for value in (f"{year}-02-30", f"{year}-13-01", f"12/31/{year}", f"1850-06-{random.randint(10, 28)}"):
        used_secrets.identity.add(value)
    lines: list[bytes] = []
    expect: list[tuple[str, str, str]] = []      # (where, column, reason fragment), one per data row
    good = _row(used_secrets, "R-good")

    def add(where: str, column: str, reason: str, line: bytes) -> None:
        lines.append(line)
        expect.append((where, column, reason))

    def row(where: str, column: str, reason: str, **over: str) -> None:
        add(where, column, reason, _line(_row(used_secrets, over.pop("source_ref", f"R{len(lines)}"), **over)))

    add("ok", "", "", _line(good))
    # Rejected rows (the rejects file).
    row("reject", "source_ref", "is empty", source_ref="")
    row("reject", "source_ref", "without leading or trailing spaces", source_ref=" R-space")
    row("reject", "source_ref", "printable characters", source_ref="R" * 129)
    row("reject", "source_ref", "printable characters", source_ref="R-\x01ctl")
    row("reject", "source_ref", "duplicates the source_ref of row 2", source_ref="R-good")
    row("reject", "given_name,family_name", "no usable name", given_name="", family_name="")
    row("reject", "given_name,family_name", "given_name: has no letters", given_name="1234", family_name="")
    row("reject", "given_name,family_name", "given_name: is longer than 100", given_name="A" * 150, family_name="")
    row("reject", "given_name,family_name", "given_name: contains control", given_name="Ann\x07", family_name="")
    add("reject", "(row)", "has 13 columns; the header has 14", _line(_row(used_secrets, "R-few")).rsplit(b",", 1)[0])
    add("reject", "(row)", "has 15 columns; the header has 14", _line(_row(used_secrets, "R-many")) + b",extra")
    add("reject", "family_name", "is not valid UTF-8",
        _line(_row(used_secrets, "R-latin1", family_name="M\udce9ndez")))
    add("reject", "source_ref", "is not valid UTF-8", _line(_row(used_secrets, "R-\udcff")))
    add("reject", "locality", "contains a NUL byte", _line(_row(used_secrets, "R-nul")).replace(b"Springfield",
                                                                                                 b"Spring\x00field"))
    add("reject", "(row)", "is empty", b"")
    row("reject", "address_line2", "is longer than 1000 characters", address_line2="x" * 1200)
    add("reject", "(row)", "is not valid CSV", b'R-quote,"Theo"dora,Smith' + b"," * 11)
    # Accepted rows with a dropped attribute (the report's warnings).
    row("warn", "date_of_birth", "is not a calendar date", date_of_birth=f"{year}-02-30")
    row("warn", "date_of_birth", "is not a calendar date", date_of_birth=f"{year}-13-01")
    row("warn", "date_of_birth", "must be YYYY-MM-DD", date_of_birth=f"12/31/{year}")
    row("warn", "date_of_birth", "must be between 1900 and today", date_of_birth="2999-01-01")
    row("warn", "date_of_birth", "must be between 1900 and today", date_of_birth=f"1850-06-{random.randint(10, 28)}")
    row("warn", "national_id", "is not a valid US_SSN", national_id="000-12-3456", national_id_type="US_SSN")
    row("warn", "national_id", "fails the CA_SIN check digit", national_id=_bad_sin(used_secrets),
        national_id_type="CA_SIN")
    row("warn", "national_id", "is not a valid UK National Insurance", national_id="QQ123456Z",
        national_id_type="GB_NINO")
    row("warn", "national_id_type", "must be one of", national_id="ABC12345", national_id_type="XX_ID")
    row("warn", "national_id", "an opaque national id must be 4-20", national_id="ab1")
    row("warn", "national_id", "is empty but national_id_type is set", national_id_type="US_SSN")
    row("warn", "phone", "is not a phone number", phone="call me")
    row("warn", "phone", "is not a valid number", phone="12-34")
    row("warn", "email", "is not an email address", email="someone@")
    row("warn", "country", "ISO 3166-1 alpha-2", country="USA")
    row("warn", "postcode", "must be letters and digits", postcode="62@04")
    row("warn", "address_line1", "is longer than 200", address_line1="9 " + "Long " * 50)
    row("warn", "given_name", "contains control", given_name="Theo\x1bdora")
    row("warn", "locality", "contains control", locality="Spring\x7ffield")
    row("warn", "family_name", "has no letters", family_name="--")
    used_secrets.identity |= {"000123456", "QQ123456Z", "ABC12345"}

    code, report, rejects = _import(tmp_path, "customers", _write(tmp_path / "dirty.csv", lines), system)
    out = capsys.readouterr()
    assert code == 0, out.err
    by_row_reject = {int(r["row"]): r for r in rejects}
    by_row_report = {int(r["row"]): r for r in report}
    kinds = set()
    for n, (where, column, reason) in enumerate(expect, start=2):
        if where == "reject":
            got = by_row_reject.get(n)
            assert got is not None and n not in by_row_report, (n, column, reason)
            assert got["column"] == column and reason in got["reason"], (n, got)
        else:
            got = by_row_report.get(n)
            assert got is not None and n not in by_row_reject, (n, column, reason)
            if where == "warn":
                assert any(w.startswith(f"{column}: ") and reason in w for w in got["warnings"].split("; ")), \
                    (n, got)
            else:
                assert got["warnings"] == "" and got["decision"] in ("new", "possible_match"), got
        kinds.add((where, column, reason))
    assert len(kinds - {("ok", "", "")}) >= 30
    # Counts add up, and say so.
    assert len(report) + len(rejects) == len(expect)
    assert f"{len(expect)} rows read, {len(report)} accepted" in out.out and f"{len(rejects)} rejected" in out.out
    # No value of a cell is written anywhere: only source refs (the report's key) and shapes.
    text = (tmp_path / "dirty-report.csv").read_text() + (tmp_path / "dirty-rejects.csv").read_text() \
        + out.out + out.err
    for secret in used_secrets.identity | {"Theodora", "vasquez", "Orchard", "Springfield", "217 555", "example.com"}:
        assert secret not in text, secret
    assert "vasquez" not in (tmp_path / "dirty-rejects.csv").read_text()


def test_rows_are_lines_and_a_quote_never_closed_names_the_lines_it_took(
        env_vars: None, used_secrets: UsedSecrets, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        reader: str) -> None:
    """A row is the line its record starts on (a quoted cell over two lines moves the next rows down
    one), and a quote never closed is one rejected row naming the lines to the end of the file, in
    the rejects file and in the summary (rows read = accepted + rejected still)."""
    system = "lines-" + uuid.uuid4().hex[:6]
    two_lines = _row(used_secrets, "L-2", address_line2="Flat 2\nthe Old Mill")
    lines = [_line(_row(used_secrets, "L-1")), _line(two_lines), _line(_row(used_secrets, "L-3")),
             b'"open quote, never closed' + b"," * 13, _line(_row(used_secrets, "L-5")),
             _line(_row(used_secrets, "L-6"))]
    code, report, rejects = _import(tmp_path, "customers", _write(tmp_path / "lines.csv", lines), system)
    out = capsys.readouterr().out
    assert code == 0
    assert [(r["row"], r["source_ref"]) for r in report] == [("2", "L-1"), ("3", "L-2"), ("5", "L-3")]
    assert [(r["row"], r["column"]) for r in rejects] == [("6", "(row)")]
    assert "lines 6-8 (to the end of the file) could not be read" in rejects[0]["reason"]
    assert "4 rows read, 3 accepted" in out and "1 rejected; lines 6-8 are one rejected row: a quote opened on" \
        " line 6 is never closed" in out


def test_header_problems_refuse_the_file(env_vars: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         reader: str) -> None:
    header = HEADER.replace("email", "e_mail").replace(",region", "").encode()
    code, report, rejects = _import(tmp_path, "customers", _write(tmp_path / "hdr.csv", [b"x"], header), "hdr")
    assert code == 1 and not report
    problems = {(r["row"], r["column"], r["reason"].split(";")[0]) for r in rejects}
    assert ("1", "(header)", "unknown column 'e_mail'") in problems
    assert ("1", "email", "missing from the header") in problems and ("1", "region", "missing from the header") \
        in problems
    assert "nothing imported" in capsys.readouterr().err


def test_outputs_naming_the_input_or_a_missing_directory_are_refused_before_anything_is_opened(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--report or --rejects naming the input (by its path, another path to it, a symlink, a hard link)
    truncated it before it was read; a missing directory ended in a traceback. Each is now one line
    and exit 2, before settings, PostgreSQL or any file is opened: the input unchanged, nothing made."""
    source = _write(tmp_path / "in.csv", [b"R1,Ann,Lee" + b"," * 11])
    before = source.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "symlink.csv").symlink_to(source)
    os.link(source, tmp_path / "hardlink.csv")
    report, elsewhere = str(tmp_path / "report.csv"), str(tmp_path / "sub" / ".." / "report.csv")
    cases = [
        (["--report", str(source)], "--report"),
        (["--report", str(tmp_path / "sub" / ".." / "in.csv")], "--report"),
        (["--report", report, "--rejects", str(tmp_path / "symlink.csv")], "--rejects"),
        (["--report", str(tmp_path / "hardlink.csv")], "--report"),
        (["--report", report, "--rejects", elsewhere], "--report and --rejects are the same file"),
        (["--report", "/nonexistent/dir/r.csv"], "no directory /nonexistent/dir"),
        (["--report", report, "--rejects", "/nonexistent/dir/j.csv"], "no directory /nonexistent/dir"),
        (["--report", str(tmp_path / "sub")], "is a directory"),
    ]
    files = sorted(tmp_path.rglob("*"))
    for kind in ("customers", "cards"):
        for extra, expect in cases:
            code = crs(["import", kind, str(source), "--source", "s", *extra])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and expect in err and "nothing was read or written" in err, \
                (extra, err)
            assert source.read_bytes() == before and sorted(tmp_path.rglob("*")) == files


def test_matching_in_file_and_against_existing_then_rerun_creates_nothing(
        env_vars: None, dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets, tmp_path: Path,
        reader: str, capsys: pytest.CaptureFixture[str]) -> None:
    system = "core-" + uuid.uuid4().hex[:6]
    ssn = _ssn(used_secrets)
    existing_row = _row(used_secrets, "X", national_id=ssn, national_id_type="US_SSN")
    person = pb.IdentityAttributes(
        given_name=existing_row["given_name"], family_name=existing_row["family_name"],
        date_of_birth=existing_row["date_of_birth"], national_id=ssn, national_id_type="US_SSN",
        address=pb.PostalAddress(line1=existing_row["address_line1"], postcode=existing_row["postcode"], country="US"))
    existing = node_a.admin.CreateCustomer(pb.CreateCustomerRequest(
        identity=person, source_ref=pb.SourceRef(system="onboarding", key=uuid.uuid4().hex[:10])), timeout=10)
    # The same person from this system, with another phone and address: the national id and date of birth.
    joins = dict(existing_row, source_ref="J-1", given_name="Teddy", phone="", address_line1="9 Elm St")
    twin_a = _row(used_secrets, "T-1", given_name="Leopold", address_line1=f"{random.randint(10, 999)} Quarry Road",
                  postcode=f"{random.randint(10000, 99999)}", phone="")
    y, m, d = twin_a["date_of_birth"].split("-")
    twin_b = dict(twin_a, source_ref="T-2", given_name="Leo", date_of_birth=f"{y}-{d}-{m}", email="")
    loner = _row(used_secrets, "L-1", given_name="Octavia", address_line1="7 Canal Walk",
                 postcode=f"{random.randint(10000, 99999)}", phone="")
    file = _write(tmp_path / "people.csv", [_line(r) for r in (joins, twin_a, loner, twin_b)])
    seq_before = _sql(dev_env, "SELECT coalesce(max(seq), 0) AS s FROM outbox")[0]["s"]

    code, report, rejects = _import(tmp_path, "customers", file, system)
    assert code == 0 and not rejects
    # Three rows are `new` (the twin's second record joined the first's), two customers were created.
    assert "4 rows read, 4 accepted (matched 1, new 3 (2 customers)), 0 rejected" in capsys.readouterr().out
    got = {r["source_ref"]: r for r in report}
    assert got["J-1"]["customer_id"] == existing.customer_id and got["J-1"]["decision"] == "matched"
    assert float(got["J-1"]["score"]) >= 0.99
    assert got["T-1"]["customer_id"] == got["T-2"]["customer_id"] != got["L-1"]["customer_id"]
    assert got["T-1"]["decision"] == got["T-2"]["decision"] == "new" and float(got["T-2"]["score"]) >= 0.99
    resolved = node_a.identity.ResolveSourceRef(pb.SourceRef(system=system, key="T-2"), timeout=5)
    assert resolved.customer_id == got["T-1"]["customer_id"]
    golden = node_a.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(customer_id=existing.customer_id),
                                                 timeout=5)
    assert {r.system for r in golden.source_refs} == {"onboarding", system}
    # The feed: one created per new customer, a record_added (with the cache key) for the joined one.
    events = _sql(dev_env, "SELECT event_type, entity_id, cache_keys, seq, feed_op FROM outbox WHERE seq > $1"
                           " ORDER BY seq", seq_before)
    mine = [(e["event_type"], e["entity_id"]) for e in events
            if e["entity_id"] in {r["customer_id"] for r in report}]
    assert sorted(mine) == sorted([("customer.created", got["T-1"]["customer_id"]),
                                   ("customer.created", got["L-1"]["customer_id"]),
                                   ("customer.record_added", existing.customer_id)])
    added = next(e for e in events if e["event_type"] == "customer.record_added"
                 and e["entity_id"] == existing.customer_id)
    assert added["cache_keys"] and existing.customer_id in added["cache_keys"][0]
    profile = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=existing.customer_id), timeout=5)
    assert profile.customer.version == existing.version + 1
    # Re-running the same file creates nothing.
    count = _sql(dev_env, "SELECT count(*) AS n FROM customers")[0]["n"]
    code, again, _ = _import(tmp_path, "customers", file, system)
    assert code == 0 and {r["decision"] for r in again} == {"existing"}
    assert {r["source_ref"]: r["customer_id"] for r in again} == {k: v["customer_id"] for k, v in got.items()}
    assert _sql(dev_env, "SELECT count(*) AS n FROM customers")[0]["n"] == count
    assert not any("differ from the record on file" in r["warnings"] for r in again)
    # The same references with changed attributes: still `existing` (the reference is the key), but
    # each changed row says its attributes were not applied instead of dropping them unseen.
    changed = _write(tmp_path / "people-changed.csv", [_line(dict(loner, family_name="Renamed")), _line(twin_a)])
    code, third, _ = _import(tmp_path, "customers", changed, system)
    assert code == 0 and [(r["source_ref"], r["decision"]) for r in third] == [("L-1", "existing"), ("T-1", "existing")]
    assert "attributes: differ from the record on file, not applied" in third[0]["warnings"]
    assert "differ from the record on file" not in third[1]["warnings"]


def test_a_person_across_batches_is_one_customer(env_vars: None, dev_env: DevEnvironment, node_a: Clients,
                                                used_secrets: UsedSecrets, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch N+1 is searched while batch N's transaction is still open (docs/identity.md, "Bulk
    import"): it must still find the customers batch N creates, and batch N+2 a customer whose records
    are partly committed and partly in the open transaction."""
    search, write = BulkCustomers.search, BulkCustomers.write
    searched: list[int] = []
    another_search = asyncio.Event()

    async def counted(self: BulkCustomers, *args: Any, **kwargs: Any) -> Any:
        found = await search(self, *args, **kwargs)
        searched.append(found.rows_done)
        another_search.set()
        return found

    async def after_next_search(self: BulkCustomers, plan: Any, run: str) -> Any:
        # Hold batch N's transaction until batch N+1 was searched, so that search cannot see it. That
        # search runs meanwhile: give it all the time a busy machine may need (not 400 x 5 ms, which a
        # search slowed 2.5 s outlasted), since the wait ends as soon as it is done.
        batches = len(searched)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while not (len(searched) > batches or batches == 3):
                    another_search.clear()
                    await another_search.wait()
        assert len(searched) > batches or batches == 3, "the next batch was not searched during the write"
        return await write(self, plan, run)

    monkeypatch.setattr(BulkCustomers, "search", counted)
    monkeypatch.setattr(BulkCustomers, "write", after_next_search)
    system = "span-" + uuid.uuid4().hex[:6]
    first = _row(used_secrets, "P-1", given_name="Leopold", phone="")
    y, m, d = first["date_of_birth"].split("-")
    second = dict(first, source_ref="P-2", given_name="Leo", date_of_birth=f"{y}-{d}-{m}", email="")
    third = dict(first, source_ref="P-3", email="")
    fillers = [_row(used_secrets, f"F-{i}", given_name=name, address_line1=f"{random.randint(1, 999)} Weir Row",
                    postcode=f"{random.randint(10000, 99999)}", phone="")
               for i, name in enumerate(("Octavia", "Barnaby", "Clementine"))]
    rows = [first, fillers[0], second, fillers[1], third, fillers[2]]    # batches of two: P-n in batch n
    file = _write(tmp_path / "span.csv", [_line(r) for r in rows])
    code, report, rejects = _import(tmp_path, "customers", file, system, "--batch", "2")
    assert code == 0 and not rejects
    got = {r["source_ref"]: r for r in report}
    assert got["P-1"]["customer_id"] == got["P-2"]["customer_id"] == got["P-3"]["customer_id"]
    assert [got[k]["decision"] for k in ("P-1", "P-2", "P-3")] == ["new", "matched", "matched"]
    assert len({got[f"F-{i}"]["customer_id"] for i in range(3)} | {got["P-1"]["customer_id"]}) == 4
    assert searched[:3] == [3, 5, 7]       # (the reader may end with an empty batch)
    profile = node_a.lookup.GetCustomer(pb.GetCustomerRequest(customer_id=got["P-1"]["customer_id"]), timeout=5)
    assert profile.customer.version == 3           # created, then a record added by each later batch
    assert _sql(dev_env, "SELECT count(*) AS n FROM source_records WHERE customer_id = $1",
                got["P-1"]["customer_id"])[0]["n"] == 3


def test_a_source_systems_thousands_of_records_of_one_person_are_one_customer(
        env_vars: None, dev_env: DevEnvironment, used_secrets: UsedSecrets, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """1,200 records of one person with the same attributes (a row per account, say): before, every
    block of theirs held more than MAX_BLOCK rows of the batch, or records of the customer the first
    batch made, so each was skipped and each row became a customer of its own, with no review task.
    And the second batch's rows are scored once against the customer's one distinct record, not each
    against its 1,000 (3,000 rows took 25 s so, 1 s now)."""
    from server.identity.model import MatchModel
    scored, real = [0], MatchModel.score

    def counted(self: MatchModel, a: Any, b: Any) -> Any:
        scored[0] += 1
        return real(self, a, b)
    monkeypatch.setattr(MatchModel, "score", counted)
    system = "many-" + uuid.uuid4().hex[:6]
    person = _row(used_secrets, "")
    file = _write(tmp_path / "one-person.csv", [_line(dict(person, source_ref=f"P-{i}")) for i in range(1_200)])
    code, report, rejects = _import(tmp_path, "customers", file, system)
    assert code == 0 and not rejects
    assert scored[0] < 20
    assert "1200 rows read, 1200 accepted (matched 200, new 1000 (1 customers)), 0 rejected" in capsys.readouterr().out
    assert len({r["customer_id"] for r in report}) == 1


def test_a_search_counts_each_record_once_whenever_the_previous_batch_commits(
        dev_env: DevEnvironment, used_secrets: UsedSecrets, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next batch's search may see the previous batch committed (its transaction can commit
    between the search's statements): its records then come from PostgreSQL and from Unwritten, and
    must count once, or a block would look crowded and be skipped (a block crowded by many customers'
    records is). Checked on the blocks' counts themselves, as `_chosen` gets them: a block crowded by
    one customer's records is no longer skipped (twentieth audit), so the match alone would not show a
    double count."""
    from server.identity.attributes import parse_identity
    from server.identity.model import MatchModel, Thresholds
    from server.settings import load_settings
    from server.store import identity as identity_store
    from server.store.bulk import ImportRow
    from server.store.db import active_data_key
    from server.store.identity import IdentityCodec

    counted: list[dict[int, int]] = []
    chosen = identity_store._chosen

    def counting(hashes: list[int], per_block: dict[int, dict[int, str]], *args: Any) -> list[str]:
        counted.append({h: len(per_block.get(h, {})) for h in hashes})
        return chosen(hashes, per_block, *args)

    monkeypatch.setattr(identity_store, "_chosen", counting)
    person = _row(used_secrets, "", phone="")
    raw = {k: v for k, v in person.items() if k not in ("source_ref", "national_id_type")}
    raw |= {"address_line1": person["address_line1"]}
    identity = parse_identity(raw, strict=True)[0]
    settings = load_settings(dict(dev_env.keys) | {"CRS_PG_DSN": dev_env.operator_dsn, "CRS_ALLOW_PLAINTEXT": "true",
                                                  "CRS_ALLOW_ANONYMOUS": "true"})
    system = "once-" + uuid.uuid4().hex[:6]

    async def go() -> tuple[list[str], list[str]]:
        pool = await asyncpg.create_pool(dev_env.operator_dsn, min_size=1, max_size=2)
        try:
            keyring = settings.keyring()
            bulk = BulkCustomers(pool=pool, codec=IdentityCodec(keyring=keyring, data_key=await active_data_key(
                pool, keyring)), model=MatchModel.load(), thresholds=Thresholds(), system=system)
            first = bulk.plan(await bulk.search([ImportRow(2, "A-1", identity), ImportRow(3, "A-2", identity)], 3))
            await bulk.write(first, "run-" + system)                      # committed before the next search
            query = [ImportRow(4, "B-1", identity)]
            counted.clear()
            both = await bulk.search(query, 4, unwritten=first.unwritten)  # PostgreSQL and Unwritten hold them
            alone = await bulk.search(query, 4)
            return [c for c, _ in both.scored[0]], [c for c, _ in alone.scored[0]]
        finally:
            await pool.close()

    both, alone = asyncio.run(go())
    assert both == alone and len(both) == 1
    assert len(counted) == 2 and counted[0] == counted[1], counted        # each record once, from either source
    assert set(counted[0].values()) == {2}, counted                     # in each of the person's blocks


def test_an_interrupted_import_resumes(env_vars: None, dev_env: DevEnvironment, used_secrets: UsedSecrets,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    system = "resume-" + uuid.uuid4().hex[:6]
    file = _write(tmp_path / "big.csv", [_line(_row(used_secrets, f"P{i}", given_name=random.choice(
        ("Ada", "Bram", "Cyril", "Dora", "Enid", "Felix")) + "x" * i)) for i in range(30)])
    real = BulkCustomers.write
    calls = 0

    async def crash_on_third(self: BulkCustomers, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt    # the operator's Ctrl-C (or a crash) after two committed batches
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(BulkCustomers, "write", crash_on_third)
    capsys.readouterr()
    code, _, _ = _import(tmp_path, "customers", file, system, "--batch", "10")
    assert code == 130
    assert capsys.readouterr().err.splitlines()[-1] == ("crs import: interrupted after row 21 (committed); run the"
                                                        " same command again to resume")
    run = _sql(dev_env, "SELECT rows_done, finished_at FROM import_runs WHERE source_system = $1", system)
    assert len(run) == 1 and run[0]["rows_done"] == 21 and run[0]["finished_at"] is None
    assert _sql(dev_env, "SELECT count(*) AS n FROM source_records WHERE source_system = $1", system)[0]["n"] == 20
    monkeypatch.setattr(BulkCustomers, "write", real)
    first_report = (tmp_path / "big-report.csv").read_text()
    code, report, _ = _import(tmp_path, "customers", file, system, "--batch", "10")
    assert code == 0 and len(report) == 30
    assert [r["decision"] for r in report].count("existing") == 20
    # The interrupted run's report, with those 20 rows' own decisions, is kept beside the new one.
    assert (tmp_path / "big-report.csv.1").read_text() == first_report and first_report.count("\n") == 21
    assert "the earlier run's report is kept as big-report.csv.1" in capsys.readouterr().err
    assert _sql(dev_env, "SELECT count(*) AS n FROM source_records WHERE source_system = $1", system)[0]["n"] == 30
    run = _sql(dev_env, "SELECT rows_done, finished_at FROM import_runs WHERE source_system = $1", system)
    assert run[0]["rows_done"] == 31 and run[0]["finished_at"] is not None


def test_sigint_stops_an_import_started_with_sigint_ignored_and_the_rerun_resumes(
        env_vars: None, dev_env: DevEnvironment, used_secrets: UsedSecrets, tmp_path: Path, reader: str) -> None:
    """A background job of a non-interactive shell (`crs import ... &` in a script, some CI runners)
    starts with SIGINT ignored, and Python then sets no handler: the import never stopped on SIGINT.
    `crs` installs Python's handler (server/cli/base.py, stop_on_sigint), so a real SIGINT in the
    middle of a batch stops it after the last commit, with one line saying where, and exit 130."""
    system = "sigint-" + uuid.uuid4().hex[:6]
    bad = _line(dict(_row(used_secrets, "S-bad"), source_ref=""))      # row 2: rejected when read
    # Enough rows that the reader (in its own process, with `process`) is still at work when the
    # interrupt comes: it must not lose what it already wrote to the rejects file.
    file = _write(tmp_path / "sig.csv", [bad, *(_line(_row(used_secrets, f"S{i}", bulk=True, given_name=random.choice(
        ("Ada", "Bram", "Cyril", "Dora", "Enid", "Felix")) + "y" * (i % 40))) for i in range(SIGINT_ROWS))])
    rejects = tmp_path / "sig-rejects.csv"
    argv = ["import", "customers", str(file), "--source", system, "--report", str(tmp_path / "r.csv"), "--batch", "10",
            "--rejects", str(rejects)]
    child = subprocess.Popen(with_sigint_ignored([sys.executable, "-c", HOLD_THIRD_WRITE, reader, *argv]), cwd=ROOT,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        for expected in ("sigint ignored\n", "holding\n"):
            said = child.stdout.readline()
            if said != expected:   # say why: a child that ended early left its reason on stderr
                child.kill()
                _, err = child.communicate(timeout=30)
                pytest.fail(f"the import said {said!r}, not {expected!r}; exit {child.returncode};"
                            f" stderr:\n{err[-3000:]}")
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert err.splitlines()[-1] == "crs import: interrupted after row 22 (committed); run the same command again" \
        " to resume" and "Traceback" not in err, err
    assert _sql(dev_env, "SELECT count(*) AS n FROM source_records WHERE source_system = $1", system)[0]["n"] == 20
    # What was refused before the interrupt is in the rejects file (the reader process used to be
    # killed with its rows still in its buffer: an empty file).
    assert [(r["row"], r["column"]) for r in _read(rejects)] == [("2", "source_ref")]
    code, report, _ = _import(tmp_path, "customers", file, system, "--batch", "10")
    assert code == 0 and [r["decision"] for r in report].count("existing") == 20 and len(report) == SIGINT_ROWS


def test_accounts_and_cards_import_then_resolve_card(
        env_vars: None, dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    system = "cards-" + uuid.uuid4().hex[:6]
    people = _write(tmp_path / "owners.csv", [_line(_row(used_secrets, "O-1", given_name="Hyacinth")),
                                              _line(_row(used_secrets, "O-2", given_name="Ignatius"))])
    code, owners, _ = _import(tmp_path, "customers", people, system)
    assert code == 0
    routing = "021000021"
    n1, n2 = fresh_account_number(used_secrets), fresh_account_number(used_secrets)
    accounts = tmp_path / "accounts.csv"
    accounts.write_text("source_ref,customer_source_ref,routing_number,account_number,type,currency\n"
                        f"A-1,O-1,{routing},{n1},CHECKING,USD\nA-2,O-2,{routing},{n2},savings,\n"
                        f"A-3,O-9,{routing},{fresh_account_number(used_secrets)},CHECKING,USD\n"
                        f"A-4,O-1,123456789,{fresh_account_number(used_secrets)},CHECKING,USD\n"
                        f"A-5,O-1,{routing},12ab,CHECKING,USD\nA-6,O-1,{routing},{n1}0,LOAN,USD\n"
                        f"A-7,O-1,{routing},{fresh_account_number(used_secrets)},CHECKING,ZZZ\n")
    capsys.readouterr()
    code, acc_report, acc_rejects = _import(tmp_path, "accounts", accounts, system)
    assert code == 0
    assert [(r["source_ref"], r["decision"]) for r in acc_report] == [("A-1", "created"), ("A-2", "created")]
    # In row order, a write's reject (row 4: no such customer) before the later rows' parsing ones.
    assert [(r["row"], r["column"]) for r in acc_rejects] == [("4", "customer_source_ref"), ("5", "routing_number"),
                                                             ("6", "account_number"), ("7", "type"),
                                                             ("8", "currency")]
    assert "accounts: 7 rows read, 2 accepted (created 2), 5 rejected" in capsys.readouterr().out
    used_secrets.account_numbers.add(n1 + "0")
    pan, bad_pan = fresh_pan(used_secrets), fresh_pan(used_secrets)
    bad_pan = bad_pan[:-1] + str((int(bad_pan[-1]) + 1) % 10)
    used_secrets.pans.add(bad_pan)
    cards = tmp_path / "cards.csv"
    cards.write_text("source_ref,routing_number,account_number,pan,expiry\n"
                     f"K-1,{routing},{n1},{pan},2030-11\nK-2,{routing},{n2},{bad_pan},2030-11\n"
                     f"K-3,{routing},{n2},{fresh_pan(used_secrets)},11/30\n"
                     f"K-4,{routing},{fresh_account_number(used_secrets)},{fresh_pan(used_secrets)},2030-11\n"
                     f"K-5,{routing},{n2},{fresh_pan(used_secrets)},2030-13\n")
    code, card_report, card_rejects = _import(tmp_path, "cards", cards, system)
    assert code == 0 and [(r["source_ref"], r["decision"]) for r in card_report] == [("K-1", "created")]
    assert [(r["row"], r["column"]) for r in card_rejects] == [("3", "pan"), ("4", "expiry"), ("5", "account_number"),
                                                              ("6", "expiry")]
    # Accepted rows counted by decision (not by card token).
    assert "cards: 5 rows read, 1 accepted (created 1), 4 rejected" in capsys.readouterr().out
    answer = node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5)
    owner = next(r["customer_id"] for r in owners if r["source_ref"] == "O-1")
    assert answer.customer.customer_id == owner
    # Re-running creates nothing; no clear number in any report or rejects file.
    code, again, _ = _import(tmp_path, "cards", cards, system)
    assert code == 0 and [(r["source_ref"], r["decision"]) for r in again] == [("K-1", "existing")]
    assert "1 accepted (existing 1)" in capsys.readouterr().out
    text = "".join(p.read_text() for p in tmp_path.glob("*-re*.csv"))
    for secret in used_secrets.pans | used_secrets.account_numbers:
        assert secret not in text


def _forms(pan: str) -> list[str]:
    """A PAN as it may be written, and its digits beyond the first six (all a mask may not show)."""
    return [pan, " ".join(pan[i:i + 4] for i in range(0, 16, 4)), "-".join(pan[i:i + 4] for i in range(0, 16, 4)),
            pan[6:]]


def _assert_nowhere(pans: list[str], *texts: str) -> None:
    for text in texts:
        for pan in pans:
            for form in _forms(pan):
                assert form not in text, "a card number was echoed"


def test_card_numbers_as_source_refs_or_in_attributes_are_refused_never_echoed(
        env_vars: None, dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], reader: str) -> None:
    """B3/B4 of the outside verification: a card number as a row's source_ref rejects the row (its
    shape only); one in a free-text attribute drops the attribute with a warning. Neither is echoed
    in the report, rejects, stdout or stderr, stored in source_records, or answered by GetCustomerIdentity."""
    system = "pci-" + uuid.uuid4().hex[:6]
    pans = [fresh_pan(used_secrets) for _ in range(7)]
    rows = [_row(used_secrets, "P-ok"),
            _row(used_secrets, pans[0]),                                 # row 3: the PAN as the key
            _row(used_secrets, "CARD " + _forms(pans[1])[1]),            # row 4: inside it, in groups
            _row(used_secrets, _forms(pans[2])[2]),                      # row 5: in groups with dashes
            _row(used_secrets, "W-1", address_line2=f"card {_forms(pans[3])[1]} x", region=pans[4]),
            _row(used_secrets, "W-2", given_name=f"Theodora {pans[5]}", email=f"{pans[6]}@example.com")]
    file = _write(tmp_path / "pci.csv", [_line(r) for r in rows])
    code, report, rejects = _import(tmp_path, "customers", file, system)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert [(r["row"], r["column"], r["reason"]) for r in rejects] == [
        (str(n), "source_ref", CARD_NUMBER) for n in (3, 4, 5)]
    assert [r["shape"] for r in rejects] == ["9999999999999999 (16 chars)", "XXXX 9999 9999 9999 9999 (24 chars)",
                                             "9999-9999-9999-9999 (19 chars)"]
    got = {r["source_ref"]: r for r in report}
    assert set(got) == {"P-ok", "W-1", "W-2"} and got["P-ok"]["warnings"] == ""
    assert got["W-1"]["warnings"].split("; ") == [f"address_line2: {CARD_NUMBER}", f"region: {CARD_NUMBER}"]
    assert got["W-2"]["warnings"].split("; ") == [f"given_name: {CARD_NUMBER}", f"email: {CARD_NUMBER}"]
    assert "3 rejected" in out.out
    _assert_nowhere(pans, (tmp_path / "pci-report.csv").read_text(), (tmp_path / "pci-rejects.csv").read_text(),
                    out.out, out.err)
    keys = _sql(dev_env, "SELECT source_key FROM source_records WHERE source_system = $1", system)
    assert sorted(k["source_key"] for k in keys) == ["P-ok", "W-1", "W-2"]
    w1 = node_a.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(customer_id=got["W-1"]["customer_id"]),
                                             timeout=5)
    assert w1.attributes.address.line2 == "" and w1.attributes.address.region == ""
    assert w1.attributes.address.line1 and w1.attributes.given_name == "theodora"
    w2 = node_a.identity.GetCustomerIdentity(pb.GetCustomerIdentityRequest(customer_id=got["W-2"]["customer_id"]),
                                             timeout=5)
    assert w2.attributes.given_name == "" and w2.attributes.family_name and w2.attributes.email == ""
    _assert_nowhere(pans, str(w1), str(w2))
    # A card number as a source reference is refused on the read path too, without echo.
    err = expect_code(lambda: node_a.identity.ResolveSourceRef(pb.SourceRef(system=system, key=pans[0]), timeout=5),
                      grpc.StatusCode.INVALID_ARGUMENT)
    assert "source_ref.key" in (err.details() or "")
    _assert_nowhere(pans, err.details() or "")


def test_card_numbers_as_account_or_card_source_refs_are_rejected(
        env_vars: None, dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """B3 for accounts and cards: a card file keyed by the PAN itself (or with its source_ref and pan
    columns swapped) is rejected row by row, never reported as PAN next to its masked copy."""
    system = "pci-links-" + uuid.uuid4().hex[:6]
    code, _, _ = _import(tmp_path, "customers", _write(tmp_path / "owner.csv", [_line(_row(used_secrets, "O-1"))]),
                         system)
    assert code == 0
    routing, number = "021000021", fresh_account_number(used_secrets)
    pans = [fresh_pan(used_secrets) for _ in range(5)]
    accounts = tmp_path / "pci-accounts.csv"
    accounts.write_text("source_ref,customer_source_ref,routing_number,account_number,type,currency\n"
                        f"A-1,O-1,{routing},{number},CHECKING,USD\n"
                        f"{pans[0]},O-1,{routing},{fresh_account_number(used_secrets)},CHECKING,USD\n"
                        f"A-3,{pans[1]},{routing},{fresh_account_number(used_secrets)},CHECKING,USD\n")
    code, report, rejects = _import(tmp_path, "accounts", accounts, system)
    assert code == 0 and [r["source_ref"] for r in report] == ["A-1"]
    assert [(r["row"], r["column"], r["reason"]) for r in rejects] == [
        ("3", "source_ref", CARD_NUMBER), ("4", "customer_source_ref", CARD_NUMBER)]
    cards = tmp_path / "pci-cards.csv"
    cards.write_text("source_ref,routing_number,account_number,pan,expiry\n"
                     f"K-1,{routing},{number},{pans[2]},2030-11\n"
                     f"{pans[3]},{routing},{number},{pans[3]},2030-11\n"        # keyed by the PAN itself
                     f"{pans[4]},{routing},{number},K-5,2030-11\n")            # source_ref and pan swapped
    code, report, rejects = _import(tmp_path, "cards", cards, system)
    assert code == 0 and [(r["source_ref"], r["card"]) for r in report] == [
        ("K-1", pans[2][:6] + "******" + pans[2][-4:])]
    assert [(r["row"], r["column"], r["reason"], r["shape"]) for r in rejects] == [
        (str(n), "source_ref", CARD_NUMBER, "9999999999999999 (16 chars)") for n in (3, 4)]
    expect_code(lambda: node_a.lookup.ResolveCard(pb.ResolveCardRequest(pan=pans[3]), timeout=5),
                grpc.StatusCode.NOT_FOUND)                                    # never issued
    # A card number as the source system itself is bad usage, refused before anything is read.
    code, _, _ = _import(tmp_path, "cards", cards, pans[0])
    assert code == 2
    out = capsys.readouterr()
    assert "--source looks like a card number" in out.err
    _assert_nowhere(pans, out.out, out.err, *(p.read_text() for p in tmp_path.glob("pci-*-re*.csv")))
    assert not _sql(dev_env, "SELECT 1 FROM source_records WHERE source_key = ANY($1::text[])", pans)


def test_a_rejected_row_leaves_its_source_ref_and_a_rerun_after_a_merge_finds_its_account(
        env_vars: None, dev_env: DevEnvironment, node_a: Clients, used_secrets: UsedSecrets, tmp_path: Path) -> None:
    """A row rejected (no usable name; no such customer) takes no source_ref: a corrected row further
    down the file with the same one is loaded. And re-running an accounts import after the owner was
    merged finds the account it loaded (the owner is now the survivor): it was rejected, the replayed
    request naming another owner than the stored one."""
    system = "rerun-" + uuid.uuid4().hex[:6]
    people = _write(tmp_path / "people.csv", [
        _line(_row(used_secrets, "O-1", given_name="Hyacinth")),
        _line(_row(used_secrets, "O-2", given_name="Ignatius")),
        _line(_row(used_secrets, "O-3", given_name="", family_name="")),
        _line(_row(used_secrets, "O-3", given_name="Perpetua"))])
    code, owners, rejects = _import(tmp_path, "customers", people, system)
    assert code == 0 and [(r["row"], r["column"]) for r in rejects] == [("4", "given_name,family_name")]
    assert sorted(r["source_ref"] for r in owners) == ["O-1", "O-2", "O-3"]
    ids = {r["source_ref"]: r["customer_id"] for r in owners}
    routing, number = "021000021", fresh_account_number(used_secrets)
    accounts = tmp_path / "accounts.csv"
    accounts.write_text("source_ref,customer_source_ref,routing_number,account_number,type,currency\n"
                        f"A-1,O-9,{routing},{number},CHECKING,USD\nA-1,O-1,{routing},{number},CHECKING,USD\n")
    code, report, rejects = _import(tmp_path, "accounts", accounts, system)
    assert code == 0 and [(r["row"], r["column"]) for r in rejects] == [("2", "customer_source_ref")]
    assert [(r["row"], r["decision"], r["customer_id"]) for r in report] == [("3", "created", ids["O-1"])]
    node_a.identity.MergeCustomers(pb.MergeCustomersRequest(survivor_id=ids["O-2"], merged_id=ids["O-1"]), timeout=10)
    code, again, rejects = _import(tmp_path, "accounts", accounts, system)
    assert code == 0 and [(r["row"], r["column"]) for r in rejects] == [("2", "customer_source_ref")]
    assert [(r["row"], r["decision"], r["account_id"], r["customer_id"]) for r in again] == [
        ("3", "existing", report[0]["account_id"], ids["O-2"])]
    # The same numbers under another owner are still refused, as CreateAccount refuses them.
    other = tmp_path / "other.csv"
    other.write_text("source_ref,customer_source_ref,routing_number,account_number,type,currency\n"
                     f"A-7,O-3,{routing},{number},CHECKING,USD\n")
    code, report, rejects = _import(tmp_path, "accounts", other, system)
    assert report == [] and [(r["row"], r["column"]) for r in rejects] == [("2", "account_number")]
