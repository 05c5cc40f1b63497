"""`crs identity`: merge, unmerge, the review queue and a customer's golden record, against a running
node (crs.v1.IdentityService, docs/identity.md). Readable text by default, protobuf JSON with --json.

Writes send a fresh request_id (or --request-id, to retry one safely). Needs a client with
admin:write for writes and identity:read for reads (the dev stack's `admin` client has both).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable
from typing import Any

from server.cli.base import RAW, seconds
from server.cli.lookup import DEFAULT_TIMEOUT, add_connection_arguments, open_channel, rpc_failed
from server.proto import crs_pb2 as pb
from server.store.messages import review_status_word

# merge, unmerge, accept/reject (an accept merges): a merge moves every account of a customer and then
# invalidates their cached answers, 7-8 s for one of 24,000 on a 2-core VM. At the lookups' 5 s the CLI
# said DEADLINE_EXCEEDED for a merge that had committed (or, slower, was cancelled and rolled back).
MERGE_TIMEOUT = 120.0
STATUSES = {"open": pb.REVIEW_STATUS_OPEN, "accepted": pb.REVIEW_STATUS_ACCEPTED,
            "rejected": pb.REVIEW_STATUS_REJECTED}


def render_merge(m: pb.Merge) -> str:
    if m.unmerge:
        done = f"unmerged {m.loser_customer_id} from {m.winner_customer_id}"
        if m.skipped_account_ids:   # unlinked from the survivor since the merge: nothing to give back
            done += (f"; not restored (unlinked from {m.winner_customer_id} since the merge): "
                     + ", ".join(m.skipped_account_ids))
        return done
    return f"merged {m.loser_customer_id} into {m.winner_customer_id}"


def render_task(t: pb.ReviewTask) -> str:
    evidence = ", ".join(f"{e.attribute}={e.level}" for e in t.evidence)
    return (f"{t.review_id}  {review_status_word(t.status):8}  {t.customer_id} ~ {t.candidate_id}"
            f"  p={t.probability:.3f}  {evidence}")


def render_identity(c: pb.CustomerIdentity) -> str:
    a, addr = c.attributes, c.attributes.address
    asked = f"  (asked for {c.merged_from}, merged into it)" if c.merged_from else ""
    nid = f"****{a.national_id_last4} {a.national_id_type}".strip() if a.national_id_last4 else "-"
    place = ", ".join(p for p in (addr.line1, addr.line2, addr.locality, addr.postcode, addr.country) if p)
    lines = [f"customer     {c.customer_id}{asked}",
             f"name         {' '.join(p for p in (a.given_name, a.family_name) if p) or '-'}",
             f"national id  {nid}",
             f"address      {place or '-'}",
             f"phone        {a.phone or '-'}",
             f"email        {a.email or '-'}",
             "sources      " + (", ".join(f"{r.system}:{r.key}" for r in c.source_refs) or "-"),
             "merged ids   " + (", ".join(c.merged_ids) or "-")]
    return "\n".join(lines)


def _call(args: argparse.Namespace, make: Callable[[Any], Any], render: Callable[[Any], str]) -> int:
    import grpc
    from google.protobuf.json_format import MessageToJson

    from server import rpc

    with open_channel(args) as channel:
        try:
            reply = make(rpc.stub(channel, "IdentityService"))
        except grpc.RpcError as exc:
            return rpc_failed(exc)
    print(MessageToJson(reply, indent=2, preserving_proto_field_name=True) if args.json else render(reply))
    return 0


def _request_id(args: argparse.Namespace) -> str:
    return args.request_id or f"cli-{uuid.uuid4().hex}"


def cmd_merge(args: argparse.Namespace) -> int:
    req = pb.MergeCustomersRequest(request_id=_request_id(args), survivor_id=args.survivor, merged_id=args.merged)
    return _call(args, lambda s: s.MergeCustomers(req, timeout=args.timeout), render_merge)


def cmd_unmerge(args: argparse.Namespace) -> int:
    req = pb.UnmergeCustomerRequest(request_id=_request_id(args), merged_id=args.merged)
    return _call(args, lambda s: s.UnmergeCustomer(req, timeout=args.timeout), render_merge)


def cmd_reviews(args: argparse.Namespace) -> int:
    req = pb.ListReviewTasksRequest(status=STATUSES[args.status], page_size=args.page_size,
                                    page_token=args.page_token or "")

    def render(r: pb.ListReviewTasksResponse) -> str:
        rows = [render_task(t) for t in r.tasks] or [f"no {args.status} review tasks"]
        if r.next_page_token:
            rows.append(f"more: --page-token {r.next_page_token}")
        return "\n".join(rows)

    return _call(args, lambda s: s.ListReviewTasks(req, timeout=args.timeout), render)


def cmd_decide(args: argparse.Namespace) -> int:
    req = pb.DecideReviewTaskRequest(request_id=_request_id(args), review_id=args.review_id,
                                     accept=args.identity_command == "accept")
    return _call(args, lambda s: s.DecideReviewTask(req, timeout=args.timeout), render_task)


def source_ref(text: str) -> pb.SourceRef:
    system, sep, key = text.partition(":")
    if not sep or not system or not key:
        raise argparse.ArgumentTypeError("expected SYSTEM:KEY")
    return pb.SourceRef(system=system, key=key)


def cmd_show(args: argparse.Namespace) -> int:
    if bool(args.customer_id) == bool(args.source):
        print("crs identity show: give a CUSTOMER_ID or --source SYSTEM:KEY (one of them)", file=sys.stderr)
        return 2
    req = (pb.GetCustomerIdentityRequest(source_ref=args.source) if args.source
           else pb.GetCustomerIdentityRequest(customer_id=args.customer_id))
    return _call(args, lambda s: s.GetCustomerIdentity(req, timeout=args.timeout), render_identity)


def register(sub: Any) -> None:
    p = sub.add_parser("identity", help="merge, unmerge, review queue, golden record", description=(
        "Customer identity on a running node (docs/identity.md). Writes need admin:write, reads\n"
        "identity:read (the dev stack's `admin` client has both). Exit codes: 0 ok, 1 a gRPC error\n"
        "(printed as `CODE: details`), 2 bad usage."), formatter_class=RAW)
    isub = p.add_subparsers(dest="identity_command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, func: Callable[[argparse.Namespace], int], write: bool,
                timeout: float = DEFAULT_TIMEOUT) -> Any:
        s = isub.add_parser(name, help=help_text, description=help_text)
        if write:
            s.add_argument("--request-id", help="idempotency key (default: a fresh one); reuse it to retry")
        s.add_argument("--json", action="store_true", help="print the answer as protobuf JSON")
        s.add_argument("--timeout", type=seconds, default=timeout, help=f"seconds (default {timeout:g})")
        add_connection_arguments(s, client="admin")
        s.set_defaults(func=func)
        return s

    s = command("merge", "merge MERGED into SURVIVOR (MERGED stays as an alias of SURVIVOR)", cmd_merge, True,
                MERGE_TIMEOUT)
    s.add_argument("survivor")
    s.add_argument("merged")
    s = command("unmerge", "undo the merge of MERGED, exactly", cmd_unmerge, True, MERGE_TIMEOUT)
    s.add_argument("merged")
    s = command("reviews", "list review tasks (possible matches)", cmd_reviews, False)
    s.add_argument("--status", choices=tuple(STATUSES), default="open")
    s.add_argument("--page-size", type=int, default=0, help="default 100, at most 1000")
    s.add_argument("--page-token", help="the token the previous page printed")
    for verb, text in (("accept", "accept: merge the task's customer into its candidate"),
                       ("reject", "reject: they are two people (never proposed again)")):
        s = command(verb, text, cmd_decide, True, MERGE_TIMEOUT)
        s.add_argument("review_id")
    s = command("show", "a customer's golden record, source references and merged ids", cmd_show, False)
    s.add_argument("customer_id", nargs="?")
    s.add_argument("--source", type=source_ref, metavar="SYSTEM:KEY", help="find the customer by a source reference")
