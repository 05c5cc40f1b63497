"""`crs export` and `crs feed tail` without servers: the files, the manifest, what a failure leaves,
the --types parsing, the progress line without a total, and tail's stop/resume rules."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import ParseDict

from server.cli.base import CommandFailed
from server.cli.export import COLUMNS, EXPORT_TYPES, MANIFEST, prepare_directory, write_extract
from server.cli.feed import ENTITY_NAMES, MAX_SEQUENCE, event_json, sequence, tail, types_argument
from server.progress import ProgressBar
from server.proto import crs_pb2 as pb

CUSTOMER = pb.Customer(customer_id="cus_1", display_name="Zoë, \"Q\" Smith", segment="retail",
                       status=pb.CUSTOMER_STATUS_ACTIVE, kyc_status=pb.KYC_STATUS_VERIFIED, version=3)
CARD = pb.Card(token="tok_1", masked_pan="999912******1234", bin="999912", last4="1234",
               status=pb.CARD_STATUS_ACTIVE, expiry="2031-01", version=1)          # account_id "" (unlinked)


def _chunks(sequence: int = 42, epoch: str = "7/1") -> list[pb.SnapshotChunk]:
    return [pb.SnapshotChunk(sequence=sequence, epoch=epoch, customers=[CUSTOMER]),
            pb.SnapshotChunk(sequence=sequence, epoch=epoch, customers=[pb.Customer(customer_id="cus_2")],
                             cards=[CARD]),
            pb.SnapshotChunk(sequence=sequence, epoch=epoch, last=True)]


def _bar() -> ProgressBar:
    return ProgressBar(io.StringIO(), "exporting", None)


def test_csv_columns_are_every_proto_field_in_field_order() -> None:
    messages = {"customers": pb.Customer, "accounts": pb.Account, "cards": pb.Card, "relationships": pb.Relationship}
    assert set(COLUMNS) == set(EXPORT_TYPES) == set(messages)
    for name, message in messages.items():
        assert COLUMNS[name] == tuple(f.name for f in message.DESCRIPTOR.fields), name


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_extract_has_its_files_and_a_manifest_that_describes_them(tmp_path: Path, fmt: str) -> None:
    manifest = write_extract(iter(_chunks()), tmp_path, ["customers", "cards"], fmt, progress=_bar())
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest
    assert manifest["sequence"] == 42 and manifest["format"] == fmt and manifest["format_version"] == 1
    assert manifest["epoch"] == "7/1"
    assert manifest["types"] == ["customers", "cards"] and manifest["exported_at"].endswith("Z")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST, f"customers.{fmt}", f"cards.{fmt}"])
    for name, expected_rows in (("customers", 2), ("cards", 1)):
        entry = manifest["files"][name]
        data = (tmp_path / entry["file"]).read_bytes()
        assert entry["rows"] == expected_rows and entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    if fmt == "jsonl":
        lines = (tmp_path / "customers.jsonl").read_text().splitlines()
        assert ParseDict(json.loads(lines[0]), pb.Customer()) == CUSTOMER
        card = json.loads((tmp_path / "cards.jsonl").read_text())
        assert card["account_id"] == "" and card["status"] == "CARD_STATUS_ACTIVE"   # every field, enums by name
    else:
        rows = list(csv.reader(io.StringIO((tmp_path / "customers.csv").read_text())))
        assert rows[0] == list(COLUMNS["customers"])
        assert rows[1] == ["cus_1", "Zoë, \"Q\" Smith", "retail", "CUSTOMER_STATUS_ACTIVE", "KYC_STATUS_VERIFIED", "3",
                           ""]                                            # merged_into: not merged
        assert len(rows) == 3


@pytest.mark.parametrize("verbatim", [False, True])
def test_csv_cells_a_spreadsheet_would_run_start_with_an_apostrophe(tmp_path: Path, verbatim: bool) -> None:
    """A display name is anyone's text: `=HYPERLINK(...)` opened in a spreadsheet runs (OWASP "CSV
    injection"). Guarded by default; --csv-verbatim keeps it for programs; the manifest says which."""
    names = ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-2", "@SUM(A1)", "\tTab", "Plain = fine", "O'Neil"]
    customers = [pb.Customer(customer_id=f"cus_{i}", display_name=n) for i, n in enumerate(names)]
    chunk = pb.SnapshotChunk(sequence=1, last=True, customers=customers)
    manifest = write_extract(iter([chunk]), tmp_path, ["customers"], "csv", progress=_bar(), csv_verbatim=verbatim)
    assert manifest["csv_formula_guard"] is (not verbatim)
    rows = list(csv.reader(io.StringIO((tmp_path / "customers.csv").read_text(), newline="")))
    written = [r[1] for r in rows[1:]]
    if verbatim:
        assert written == names
    else:
        assert written == [f"'{n}" for n in names[:5]] + names[5:]
        assert [r[0] for r in rows[1:]] == [f"cus_{i}" for i in range(len(names))]   # ids untouched
    (tmp_path / "j").mkdir()
    jsonl = write_extract(iter([chunk]), tmp_path / "j", ["customers"], "jsonl", progress=_bar())
    assert "csv_formula_guard" not in jsonl                                           # jsonl: values as they are


def _failing(after: int) -> Iterator[pb.SnapshotChunk]:
    yield from _chunks()[:after]
    raise OSError("connection reset")


@pytest.mark.parametrize("chunks", [
    pytest.param(lambda: _failing(2), id="stream fails"),
    pytest.param(lambda: iter(_chunks()[:2]), id="stream ends before its last chunk"),
    pytest.param(lambda: iter([_chunks()[0], _chunks(43)[2]]), id="the point changes"),
])
def test_a_failed_export_leaves_no_file_and_no_manifest(tmp_path: Path, chunks: Any) -> None:
    with pytest.raises((OSError, CommandFailed)):
        write_extract(chunks(), tmp_path, ["customers", "cards"], "jsonl", progress=_bar())
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_directory_is_refused_unless_forced_and_then_loses_its_manifest(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CommandFailed, match="not empty"):
        prepare_directory(tmp_path, force=False)
    assert (tmp_path / MANIFEST).exists()
    prepare_directory(tmp_path, force=True)
    assert not (tmp_path / MANIFEST).exists() and (tmp_path / "notes.txt").exists()
    prepare_directory(tmp_path / "new" / "dir", force=False)
    assert (tmp_path / "new" / "dir").is_dir()


def test_types_are_parsed_singular_or_plural_in_a_fixed_order() -> None:
    parse = types_argument(EXPORT_TYPES)
    assert parse("cards, Customer") == ["customers", "cards"]
    assert types_argument(ENTITY_NAMES)("merges,card") == ["card", "merge"]
    for bad in ("", "cards,pans", "merge"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_a_progress_line_without_a_total_has_no_bar_percentage_or_eta() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, "exporting", None, clock=iter([0.0, 1.0, 2.0]).__next__)
    bar.advance(1234, "cards")
    bar.finish("sequence 9")
    assert out.getvalue() == "exporting  1,234 rows  sequence 9  617 rows/s  2.0s\n"


class FakeFeed:
    """Watch answers the scripted streams in turn: events, then optionally an error."""

    def __init__(self, *streams: tuple[list[pb.ChangeEvent], grpc.StatusCode | None]) -> None:
        self.streams = list(streams)
        self.requests: list[pb.WatchRequest] = []
        self.timeouts: list[float | None] = []

    def Watch(self, request: pb.WatchRequest, timeout: float | None = None) -> Any:
        self.requests.append(request)
        self.timeouts.append(timeout)
        events, code = self.streams.pop(0)
        return FakeCall(events, code)


class FakeCall:
    def __init__(self, events: list[pb.ChangeEvent], code: grpc.StatusCode | None) -> None:
        self.events, self.code_, self.cancelled = events, code, False

    def __iter__(self) -> Iterator[pb.ChangeEvent]:
        yield from self.events
        if self.code_ is not None:
            raise FakeError(self.code_)

    def cancel(self) -> None:
        self.cancelled = True


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "went away"


def _change(seq: int) -> pb.ChangeEvent:
    return pb.ChangeEvent(sequence=seq, entity_type=pb.ENTITY_TYPE_CUSTOMER, entity_id=f"cus_{seq}",
                          op=pb.OPERATION_UPDATE, customer=pb.Customer(customer_id=f"cus_{seq}"))


def _mark(seq: int, epoch: str = "") -> pb.ChangeEvent:
    return pb.ChangeEvent(sequence=seq, progress=pb.Progress(high_water_sequence=seq), epoch=epoch)


def test_tail_no_follow_stops_at_the_first_progress_mark() -> None:
    feed = FakeFeed(([_change(5), _change(7), _mark(9), _change(10)], None))
    out, err = io.StringIO(), io.StringIO()
    assert tail(feed, start=4, types=[], follow=False, progress=True, timeout=None, out=out, err=err) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["sequence"] for line in lines] == ["5", "7", "9"] and lines[-1]["progress"]
    assert lines[0]["customer"]["customer_id"] == "cus_5" and "caught up at sequence 9" in err.getvalue()
    out = io.StringIO()
    feed = FakeFeed(([_change(5), _mark(9)], None))
    assert tail(feed, start=4, types=[], follow=False, progress=False, timeout=None, out=out, err=err) == 0
    assert [json.loads(line)["sequence"] for line in out.getvalue().splitlines()] == ["5"]


def test_a_progress_mark_prints_its_sequence_even_at_zero() -> None:
    """protobuf's JSON mapping leaves fields at their default out: a mark at 0 would print {"progress":{}}."""
    for seq in (0, 1240):
        want = {"sequence": str(seq), "progress": {"high_water_sequence": str(seq)}}
        assert json.loads(event_json(_mark(seq))) == want


def test_from_is_a_non_negative_int64() -> None:
    assert sequence("0") == 0 and sequence(str(MAX_SEQUENCE)) == 2**63 - 1
    for bad in ("-1", str(MAX_SEQUENCE + 1), "99999999999999999999"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be from 0 to"):
            sequence(bad)


def test_tail_follow_resumes_from_the_last_sequence_after_unavailable_but_not_other_errors() -> None:
    feed = FakeFeed(([_change(5), _mark(8)], grpc.StatusCode.UNAVAILABLE), ([_change(9)], grpc.StatusCode.OUT_OF_RANGE))
    out, err, slept = io.StringIO(), io.StringIO(), []
    code = tail(feed, start=0, types=[pb.ENTITY_TYPE_CUSTOMER], follow=True, progress=True, timeout=None, out=out,
                err=err, sleep=slept.append)
    assert code == 1 and slept == [1.0]
    assert [r.from_sequence for r in feed.requests] == [0, 8]
    assert list(feed.requests[1].entity_types) == [pb.ENTITY_TYPE_CUSTOMER]
    assert "resuming from sequence 8" in err.getvalue()
    # A first connection that fails is reported, not retried.
    feed = FakeFeed(([], grpc.StatusCode.UNAVAILABLE))
    assert tail(feed, start=0, types=[], follow=True, progress=True, timeout=None, out=out, err=err,
                sleep=slept.append) == 1
    assert len(feed.requests) == 1


def test_tail_sends_its_epoch_and_resumes_with_the_epoch_of_the_last_event() -> None:
    """--epoch goes out with --from; after a break the tail resumes with the sequence and the epoch of the
    last line it printed (a promoted standby's new epoch included), and prints a mark's epoch."""
    promoted = _change(9)
    promoted.epoch = "7/2"
    feed = FakeFeed(([_change(5), _mark(8, "7/1")], grpc.StatusCode.UNAVAILABLE),
                    ([promoted], grpc.StatusCode.UNAVAILABLE), ([_mark(9, "7/2")], None))
    out, err = io.StringIO(), io.StringIO()
    assert tail(feed, start=4, types=[], follow=True, progress=True, timeout=None, out=out, err=err,
                sleep=lambda _s: None, epoch="7/1") == 1
    assert [(r.from_sequence, r.epoch) for r in feed.requests] == [(4, "7/1"), (8, "7/1"), (9, "7/2")]
    assert json.loads(out.getvalue().splitlines()[1]) == {
        "sequence": "8", "epoch": "7/1", "progress": {"high_water_sequence": "8"}}
    feed = FakeFeed(([_mark(9, "7/2")], None))
    assert tail(feed, start=4, types=[], follow=False, progress=True, timeout=None, out=out, err=err) == 0
    assert feed.requests[0].epoch == "" and "resume with --from 9 --epoch 7/2" in err.getvalue()


def test_tail_timeout_is_for_the_whole_run_and_ends_it_with_exit_0() -> None:
    """--timeout restarted on every resume (a tail that kept breaking never ended), and ended with exit 1
    "DEADLINE_EXCEEDED" as if it had failed. Now one limit for the run; reached, exit 0 and where to resume."""
    import time

    class Slow(FakeFeed):
        def Watch(self, request: pb.WatchRequest, timeout: float | None = None) -> Any:
            time.sleep(0.05)
            return super().Watch(request, timeout)

    feed = Slow(([_change(5)], grpc.StatusCode.UNAVAILABLE), ([_change(6)], grpc.StatusCode.DEADLINE_EXCEEDED))
    out, err = io.StringIO(), io.StringIO()
    assert tail(feed, start=0, types=[], follow=True, progress=True, timeout=0.1, out=out, err=err,
                sleep=lambda _s: time.sleep(0.06)) == 0
    first, second = feed.timeouts
    assert first is not None and second is not None and second < first <= 0.1
    assert "--timeout reached at sequence 6 (resume with --from 6)" in err.getvalue()
