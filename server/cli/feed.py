"""`crs feed tail`: print the change feed as JSON lines — the ops tool and the reference consumer.

One line per ChangeEvent on stdout, in commit order, in protobuf's JSON mapping with the proto field
names (`json_format.MessageToDict(..., preserving_proto_field_name=True)`; int64 fields such as
`sequence` and `version` are strings there, and fields at their default are left out). Progress marks
are printed too (`{"sequence": "N", "epoch": "E", "progress": {"high_water_sequence": "N"}}`: a consumer
checkpoints N and E) unless --no-progress. Every line carries the feed epoch (the database history its
sequence belongs to): resume with `--from N --epoch E`, and a checkpoint from a history the database no
longer has (restored from a backup) is refused instead of resumed. docs/feed.md is the manual.

Also the `--types` parsing `crs export` shares: entity type names, singular or plural.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from server.cli.base import RAW, seconds
from server.cli.lookup import add_connection_arguments, open_channel, rpc_failed
from server.proto import crs_pb2 as pb

# Entity type names on the command line (also accepted with a plural "s"), in snapshot order.
ENTITY_NAMES: dict[str, int] = {
    "customer": pb.ENTITY_TYPE_CUSTOMER,
    "account": pb.ENTITY_TYPE_ACCOUNT,
    "card": pb.ENTITY_TYPE_CARD,
    "relationship": pb.ENTITY_TYPE_RELATIONSHIP,
    "merge": pb.ENTITY_TYPE_MERGE,
}
RESUMABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")   # docs/feed.md: reconnect and resume from the checkpoint
MAX_RETRY_SECONDS = 10.0


def types_argument(allowed: Mapping[str, int]) -> Callable[[str], list[str]]:
    """An argparse `type=` for `--types a,b,c`: the names as `allowed` spells them (either accepted
    singular or plural), in `allowed`'s order; or a usage error (exit 2) naming what is accepted."""

    def canonical(name: str) -> str | None:
        return next((c for c in (name, name + "s", name.removesuffix("s")) if c in allowed), None)

    def parse(text: str) -> list[str]:
        given = [t.strip().lower() for t in text.split(",") if t.strip()]
        if not given:
            raise argparse.ArgumentTypeError("no entity type given")
        names = [canonical(t) for t in given]
        unknown = [g for g, n in zip(given, names, strict=True) if n is None]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown entity type(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return [n for n in allowed if n in names]

    return parse


def event_json(event: pb.ChangeEvent) -> str:
    from google.protobuf.json_format import MessageToDict

    if event.WhichOneof("payload") == "progress":   # spelled out: at sequence 0 the mapping would print {}
        mark = str(event.progress.high_water_sequence)
        line = {"sequence": mark, **({"epoch": event.epoch} if event.epoch else {}),
                "progress": {"high_water_sequence": mark}}
        return json.dumps(line, separators=(",", ":"))
    return json.dumps(MessageToDict(event, preserving_proto_field_name=True), separators=(",", ":"),
                      ensure_ascii=False)


def tail(feed: Any, *, start: int, types: list[int], follow: bool, progress: bool, timeout: float | None,
         out: TextIO, err: TextIO, sleep: Callable[[float], None] = time.sleep, epoch: str = "") -> int:
    """Watch from `start` (in `epoch`) and print each event; see `register` for the behaviour. A resume
    sends the sequence and the epoch of the last event printed. Returns the exit code."""
    import grpc

    cursor, delivered_any, delay = start, False, 1.0
    deadline = None if timeout is None else time.monotonic() + timeout   # the whole run's, resumes included
    while True:
        left = None if deadline is None else max(0.001, deadline - time.monotonic())
        call = feed.Watch(pb.WatchRequest(from_sequence=cursor, entity_types=types, epoch=epoch),  # type: ignore[arg-type]
                          timeout=left)
        try:
            for event in call:
                delivered_any, delay = True, 1.0
                is_mark = event.WhichOneof("payload") == "progress"
                if progress or not is_mark:
                    out.write(event_json(event) + "\n")
                    out.flush()
                cursor, epoch = event.sequence, event.epoch or epoch
                if is_mark and not follow:
                    call.cancel()
                    resume = f"--from {cursor}" + (f" --epoch {epoch}" if epoch else "")
                    print(f"caught up at sequence {cursor} (resume with {resume})", file=err)
                    return 0
        except grpc.RpcError as exc:
            if deadline is not None and time.monotonic() >= deadline and exc.code().name == "DEADLINE_EXCEEDED":
                resume = f"--from {cursor}" + (f" --epoch {epoch}" if epoch else "")
                print(f"--timeout reached at sequence {cursor} (resume with {resume})", file=err)
                return 0
            if follow and delivered_any and exc.code().name in RESUMABLE:
                print(f"{exc.code().name}: {exc.details()}; resuming from sequence {cursor} in {delay:g}s",
                      file=err)
                sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
                continue
            return rpc_failed(exc)
        print("the node ended the stream", file=err)   # a Watch does not end on its own
        return 1


def cmd_tail(args: argparse.Namespace) -> int:
    from server import rpc

    types = [ENTITY_NAMES[n] for n in args.types or ()]
    try:
        with open_channel(args) as channel:
            return tail(rpc.stub(channel, "ChangeFeedService"), start=args.start, types=types, follow=args.follow,
                        progress=args.progress, timeout=args.timeout, out=sys.stdout, err=sys.stderr,
                        epoch=args.epoch)
    except BrokenPipeError:          # `crs feed tail | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


MAX_SEQUENCE = 2**63 - 1    # int64, as WatchRequest.from_sequence


def sequence(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEQUENCE:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEQUENCE}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser("feed", help="the change feed: tail", description=(
        "The change feed (crs.v1.ChangeFeedService, docs/feed.md) from the command line. Needs a client\n"
        "with scope feed:read (the dev stack's `feed` client). A consistent copy to start from: crs export."),
        formatter_class=RAW)
    feed_sub = p.add_subparsers(dest="feed_command", required=True, metavar="COMMAND")
    s = feed_sub.add_parser("tail", help="print changes as JSON lines", description=(
        "Print every change with sequence > --from as one JSON line on stdout, in commit order (protobuf\n"
        "JSON, proto field names: sequence, committed_at, entity_type, entity_id, op, version and the\n"
        "entity after the change: customer, account, card, relationship or merge — masked as every\n"
        "answer). Once it has sent everything committed when the tail connected, and then whenever\n"
        "nothing happens for a while, the node sends a Progress mark, printed as\n"
        '{"sequence":"N","epoch":"E","progress":{"high_water_sequence":"N"}}: everything up to N was\n'
        "printed or filtered out, so N is where to resume (--from N --epoch E); --no-progress leaves marks\n"
        "out. The epoch names the database history the sequence belongs to: with --epoch, a --from from a\n"
        "history the database no longer has (it was restored from a backup, or a failover lost commits)\n"
        "is refused (OUT_OF_RANGE) instead of resumed among sequences handed out again.\n\n"
        "--follow (default) keeps printing new changes as they commit; when the stream breaks\n"
        "(UNAVAILABLE, RESOURCE_EXHAUSTED) it resumes from the last sequence printed. --no-follow stops at\n"
        "the first Progress mark, i.e. once it has printed everything committed when it connected, however\n"
        "busy the feed is (the mark is printed, and `caught up at sequence N` goes to stderr).\n\n"
        "Exit codes: 0 done (--no-follow, or --timeout reached) or stopped by a closed pipe, 1 a gRPC\n"
        "error (printed as `CODE: details`; OUT_OF_RANGE: --from was compacted, is beyond the newest change of this\n"
        "database, or --from and --epoch are from a history it no longer has; start from crs export's\n"
        "sequence and epoch),\n"
        "2 bad usage (e.g. an unknown --types name), 130 interrupted."), formatter_class=RAW)
    s.add_argument("--from", dest="start", type=sequence, default=0, metavar="N",
                   help="print changes with sequence > N (default 0: from the oldest retained)")
    s.add_argument("--epoch", default="", metavar="E",
                   help="the epoch of the event or mark --from was printed with (default: not checked)")
    s.add_argument("--types", type=types_argument(ENTITY_NAMES), metavar="T,T,...",
                   help=f"only these entity types: {', '.join(ENTITY_NAMES)} (default all)")
    s.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True,
                   help="keep following new changes (default), or stop once caught up")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="print Progress marks (default) or only changes")
    s.add_argument("--timeout", type=seconds, help="end after this many seconds in all, resumes included (exit 0,"
                   " naming the sequence to resume from; default: no limit)")
    add_connection_arguments(s, client="feed")
    s.set_defaults(func=cmd_tail)
