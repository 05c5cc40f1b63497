"""The wire contract only grows: every field number and enum number ever published keeps its name and
type, or is reserved. Nodes of two releases serve side by side during a rollout, cached answers and
feed states written by one are read by the other and by clients of either, so a number reused for
another field would be read as the wrong thing (protos/ history checked 2026-12-06: nothing removed
or renumbered yet, hence no `reserved` statement). protos/crs/v1/wire.lock lists what was published;
a new field or value is added to it with `CRS_WIRE_LOCK=update pytest tests/unit/test_wire_compat.py`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.descriptor import Descriptor, EnumDescriptor

from server.proto import crs_pb2

LOCK = Path(__file__).resolve().parents[2] / "protos" / "crs" / "v1" / "wire.lock"


def _enum(e: EnumDescriptor) -> Iterator[tuple[str, str]]:
    for v in e.values:
        yield f"{e.full_name} {v.number}", f"{v.name}"


def _message(m: Descriptor) -> Iterator[tuple[str, str]]:
    for f in m.fields:
        kind = f.message_type.full_name if f.message_type else f.enum_type.full_name if f.enum_type else str(f.type)
        yield f"{m.full_name} {f.number}", f"{f.name} {kind} {'repeated' if f.is_repeated else 'single'}"
    for nested in m.nested_types:
        yield from _message(nested)
    for e in m.enum_types:
        yield from _enum(e)


def _published() -> dict[str, str]:
    fd = crs_pb2.DESCRIPTOR
    entries = [kv for m in fd.message_types_by_name.values() for kv in _message(m)]
    entries += [kv for e in fd.enum_types_by_name.values() for kv in _enum(e)]
    return dict(entries)


def _reserved(number_key: str) -> bool:
    """Whether the field number in 'pkg.Message N' is reserved in that message now."""
    full_name, number = number_key.rsplit(" ", 1)
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    crs_pb2.DESCRIPTOR.CopyToProto(proto)
    parts = full_name.removeprefix(proto.package + ".").split(".")
    scope: list[descriptor_pb2.DescriptorProto] = list(proto.message_type)
    ranges: list[tuple[int, int]] = []
    for part in parts:
        found = next((m for m in scope if m.name == part), None)
        if found is None:
            enum = next(e for e in proto.enum_type if e.name == part) if len(parts) == 1 else None
            return enum is not None and any(r.start <= int(number) <= r.end for r in enum.reserved_range)
        ranges = [(r.start, r.end - 1) for r in found.reserved_range]
        scope = list(found.nested_type)
    return any(lo <= int(number) <= hi for lo, hi in ranges)


def test_no_published_number_changes_meaning() -> None:
    now = _published()
    if os.environ.get("CRS_WIRE_LOCK") == "update":
        locked = dict(line.split("\t") for line in LOCK.read_text().splitlines()) if LOCK.exists() else {}
        # Adds numbers never published; a changed one stays as locked (a rename is a hand edit of the lock).
        LOCK.write_text("".join(f"{k}\t{v}\n" for k, v in sorted((now | locked).items())))
    locked = dict(line.split("\t") for line in LOCK.read_text().splitlines())
    changed = [f"{k}: was '{v}', now '{now[k]}'" for k, v in locked.items() if k in now and now[k] != v]
    gone = [f"{k} ({v})" for k, v in locked.items() if k not in now and not _reserved(k)]
    assert not changed, f"published numbers that now mean something else (a new field takes a new number): {changed}"
    assert not gone, f"removed without `reserved` (number and name): {gone}"
    new = sorted(now.keys() - locked.keys())
    assert not new, f"not in {LOCK.name} yet (CRS_WIRE_LOCK=update to add them): {new}"
