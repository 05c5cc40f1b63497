"""`crs export`: a consistent extract of the repository from one Snapshot, with a manifest.

One Snapshot RPC is one consistent point: every file is as of the manifest's `sequence` (in its
`epoch`), and `Watch(from_sequence=sequence, epoch=epoch)` (or `crs feed tail --from sequence --epoch
epoch`) continues exactly from there.
Rows are written as chunks arrive (memory: one chunk), each file under a temporary name that is
renamed when the snapshot is complete; manifest.json comes last, so a directory with a manifest
holds a complete extract and a failed export leaves none.

Formats (FORMAT_VERSION 1):
  jsonl  one entity a line: protobuf JSON (`MessageToDict`, proto field names, every field even at
         its default; enums by name, int64 `version` as a string), readable back with ParseDict
  csv    a header row, then one entity a row, the columns of COLUMNS (the proto fields, in field
         order), the same values as jsonl; UTF-8, `\\n` line ends, quoted only where needed. A cell
         that a spreadsheet would run as a formula (it starts with = + - @, a tab or a carriage
         return: a display name is anyone's text) starts with an apostrophe, as OWASP advises
         ("CSV injection"); `--csv-verbatim` writes it as is, for programs (the manifest says which)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from server.cli.base import RAW, CommandFailed, seconds
from server.cli.feed import types_argument
from server.cli.lookup import add_connection_arguments, open_channel, rpc_failed
from server.cli.render import size, table
from server.progress import ProgressBar
from server.proto import crs_pb2 as pb

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# What can be exported: the name (the SnapshotChunk field; the file is `<name>.<format>`) -> its EntityType.
EXPORT_TYPES: dict[str, int] = {
    "customers": pb.ENTITY_TYPE_CUSTOMER,
    "accounts": pb.ENTITY_TYPE_ACCOUNT,
    "cards": pb.ENTITY_TYPE_CARD,
    "relationships": pb.ENTITY_TYPE_RELATIONSHIP,
}
# The CSV columns, fixed: a new proto field is appended here on purpose (tests/unit/test_export.py).
COLUMNS: dict[str, tuple[str, ...]] = {
    "customers": ("customer_id", "display_name", "segment", "status", "kyc_status", "version", "merged_into"),
    "accounts": ("account_id", "routing_number", "masked_account_number", "last4", "type", "currency", "status",
                 "version"),
    "cards": ("token", "masked_pan", "bin", "last4", "status", "expiry", "account_id", "version"),
    "relationships": ("account_id", "customer_id", "role"),
}
FORMATS = ("jsonl", "csv")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def formula_guarded(cell: Any) -> Any:
    """`cell` as a spreadsheet shows it rather than runs it: an apostrophe before a formula's start."""
    return f"'{cell}" if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) else cell


def entity_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class _HashingFile:
    """A write-only UTF-8 file that hashes what it writes (csv.writer writes to it directly)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[bytes] = open(path, "wb")   # closed by write_extract
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, text: str) -> int:
        data = text.encode()
        self.sha256.update(data)
        self.file.write(data)
        self.bytes += len(data)
        return len(text)


@dataclass
class _Output:
    name: str          # "customers"
    final: Path
    sink: _HashingFile
    fmt: str
    rows: int = 0
    csv: Any = field(default=None)
    guard: bool = True   # csv: formula_guarded cells

    def write(self, message: Any) -> None:
        row = entity_dict(message)
        if self.fmt == "csv":
            cells = [row.get(c, "") for c in COLUMNS[self.name]]
            self.csv.writerow([formula_guarded(c) for c in cells] if self.guard else cells)
        else:
            self.sink.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n")
        self.rows += 1


def prepare_directory(out: Path, *, force: bool) -> None:
    """Refuse a non-empty --out unless --force; with --force drop its manifest first, so that until
    this export completes the directory does not look like a complete extract."""
    if out.exists() and not out.is_dir():
        raise CommandFailed(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CommandFailed(f"{out} is not empty: choose another --out, or --force to replace the export's"
                                " files in it")
        (out / MANIFEST).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_extract(chunks: Iterable[pb.SnapshotChunk], out: Path, names: list[str], fmt: str, *,
                  progress: ProgressBar, now: dt.datetime | None = None, csv_verbatim: bool = False) -> dict[str, Any]:
    """Write the files of `names` (file names: "customers", ...) from a Snapshot's chunks into `out`,
    then the manifest; returns the manifest. Any error leaves no new file and no manifest behind.
    `csv_verbatim`: CSV cells as they are, formulas included (see the module's docstring)."""
    exported_at = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds").replace("+00:00", "Z")
    outputs: dict[str, _Output] = {}
    try:
        for name in names:
            sink = _HashingFile(out / f".{name}.{fmt}.partial")
            output = _Output(name, out / f"{name}.{fmt}", sink, fmt, guard=not csv_verbatim)
            if fmt == "csv":
                output.csv = csv.writer(sink, lineterminator="\n")
                output.csv.writerow(COLUMNS[name])
            outputs[name] = output
        sequence, epoch = _write_chunks(chunks, outputs, progress)
        for output in outputs.values():
            output.sink.file.flush()
            os.fsync(output.sink.file.fileno())
            output.sink.file.close()
        manifest = {
            "format_version": FORMAT_VERSION, "format": fmt, "sequence": sequence, "epoch": epoch,
            "exported_at": exported_at,
            "types": names,
            **({"csv_formula_guard": not csv_verbatim} if fmt == "csv" else {}),
            "files": {o.name: {"file": o.final.name, "rows": o.rows, "bytes": o.sink.bytes,
                               "sha256": o.sink.sha256.hexdigest()} for o in outputs.values()},
        }
        for output in outputs.values():
            output.sink.path.replace(output.final)
        partial = out / f".{MANIFEST}.partial"
        with open(partial, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        partial.replace(out / MANIFEST)
        _fsync_dir(out)
        return manifest
    finally:
        for output in outputs.values():
            output.sink.file.close()
            output.sink.path.unlink(missing_ok=True)
        (out / f".{MANIFEST}.partial").unlink(missing_ok=True)


def _write_chunks(chunks: Iterable[pb.SnapshotChunk], outputs: dict[str, _Output],
                  progress: ProgressBar) -> tuple[int, str]:
    """Write every entity of every chunk; the snapshot's sequence and epoch (the same in every chunk)."""
    sequence: int | None = None
    for chunk in chunks:
        if sequence is None:
            sequence = chunk.sequence
        elif chunk.sequence != sequence:
            raise CommandFailed(f"the snapshot changed point mid-stream ({sequence} -> {chunk.sequence})")
        rows, current = 0, ""
        for name, output in outputs.items():
            for message in getattr(chunk, name):
                output.write(message)
                rows, current = rows + 1, name
        progress.advance(rows, current)
        if chunk.last:
            progress.finish(f"sequence {sequence}")
            return sequence, chunk.epoch
    raise CommandFailed("the snapshot stream ended before its last chunk; nothing was written")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cmd_export(args: argparse.Namespace) -> int:
    names: list[str] = args.types or list(EXPORT_TYPES)
    out = Path(args.out)
    created = not out.exists()
    try:
        return _export(args, out, names)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()      # a failed export (the node unreachable, say) leaves no empty --out behind


def _export(args: argparse.Namespace, out: Path, names: list[str]) -> int:
    import grpc

    from server import rpc

    try:
        with open_channel(args) as channel:      # bad TLS arguments: refused before --out is touched
            prepare_directory(out, force=args.force)
            request = pb.SnapshotRequest(entity_types=[EXPORT_TYPES[n] for n in names])  # type: ignore[misc]
            call = rpc.stub(channel, "ChangeFeedService").Snapshot(request, timeout=args.timeout)
            try:
                manifest = write_extract(call, out, names, args.format, csv_verbatim=args.csv_verbatim,
                                         progress=ProgressBar(sys.stderr, "exporting", None, unit="rows"))
            except BaseException:
                call.cancel()
                raise
    except grpc.RpcError as exc:
        return rpc_failed(exc)
    except CommandFailed as exc:
        print(f"crs export: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        print(f"crs export: {exc}", file=sys.stderr)
        return 1
    _summary(manifest, out, sys.stdout)
    return 0


def _summary(manifest: dict[str, Any], out: Path, stream: TextIO) -> None:
    files = manifest["files"]
    table([("type", "file", "rows", "size"),
           *((name, f["file"], f"{f['rows']:,}", size(f["bytes"])) for name, f in files.items())], stream)
    epoch = f" --epoch {manifest['epoch']}" if manifest.get("epoch") else ""
    stream.write(f"{out / MANIFEST}: sequence {manifest['sequence']}; continue with"
                 f" `crs feed tail --from {manifest['sequence']}{epoch}` (or Watch from_sequence and epoch)\n")


def register(sub: Any) -> None:
    s = sub.add_parser("export", help="write a consistent extract (files + manifest) from a Snapshot",
                       description=(
        "Write every customer, account, card and relationship (or --types) as of one point — one\n"
        "ChangeFeedService.Snapshot of a running node — into --out: one file per type (customers.jsonl,\n"
        "accounts.csv, ...) and manifest.json: format_version, format, sequence and epoch (continue from\n"
        "them with `crs feed tail --from SEQUENCE --epoch EPOCH` or Watch), exported_at, types, and per\n"
        "file its rows, bytes and SHA-256. Files are written as the snapshot streams (memory: one chunk)\n"
        "under temporary names and renamed at the end; manifest.json is written last, so only a complete\n"
        "extract has one.\n"
        "Every entity is masked as every answer: no PAN or account number in clear.\n\n"
        "jsonl: one protobuf JSON object a line (proto field names, every field; enums by name, version\n"
        "as a string). csv: a header row, then the columns below, the same values, except that a cell a\n"
        "spreadsheet would run as a formula (starting = + - @, tab or CR) starts with an apostrophe\n"
        "(manifest: csv_formula_guard; --csv-verbatim writes cells as they are, for programs):\n"
        + "".join(f"  {name + ':':15}{','.join(cols)}\n" for name, cols in COLUMNS.items()) +
        "\nNeeds a client with scope feed:read (dev stack: --tls-dir DIR --client feed, the default).\n"
        "Exit codes: 0 written, 1 a gRPC error (`CODE: details`) or --out not empty without --force,\n"
        "2 bad usage (e.g. an unknown --types name), 130 interrupted."), formatter_class=RAW)
    s.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    s.add_argument("--types", type=types_argument(EXPORT_TYPES), metavar="T,T,...",
                   help="customers, accounts, cards, relationships (default all)")
    s.add_argument("--format", choices=FORMATS, default="jsonl", help="jsonl (default) or csv")
    s.add_argument("--csv-verbatim", action="store_true",
                   help="csv: write cells as they are, a leading = + - @ included (for programs, not spreadsheets)")
    s.add_argument("--force", action="store_true",
                   help="write into a non-empty --out (its manifest is removed first; same-named files replaced)")
    s.add_argument("--timeout", type=seconds, help="give up after this many seconds (default: no limit)")
    add_connection_arguments(s, client="feed")
    s.set_defaults(func=cmd_export)
