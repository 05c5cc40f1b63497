"""`crs shards ...`: the Redis shard topology, for SREs — see, plan, change, move, undo.

This module is the parser and the manuals; docs/runbooks/resharding.md is their long form. The
command bodies (parse, build settings, hand off to server/topology/, render) are
server/cli/shards_commands.py, the text they draw server/cli/shards_render.py.
"""

from __future__ import annotations

import argparse
from typing import Any

from server.cli.base import RAW, at_least_one, seconds
from server.cli.shards_commands import (
    cmd_abort,
    cmd_add,
    cmd_apply,
    cmd_flush,
    cmd_history,
    cmd_mark,
    cmd_plan,
    cmd_remove,
    cmd_replica,
    cmd_reweight,
    cmd_status,
)
from server.settings import Settings
from server.topology.policy import MIN_WAIT_TIMEOUT, WAIT_LEASES
from shard_router.ring import MAX_WEIGHT

# `plan` examines this many keys per shard by default: the sampling error of the moving fraction stays
# well under a percent, and a shard is read in seconds.
DEFAULT_PLAN_SAMPLE = 20_000
# `history` shows this many versions by default: a few moves (three versions each) and marks.
DEFAULT_HISTORY_LIMIT = 20

EPILOG = """Every command reads the same CRS_* settings as the nodes (README.md): CRS_PG_DSN (the
topology, the staged change, the move's progress and the nodes' heartbeats live in PostgreSQL),
CRS_REDIS_SHARDS (the ring nodes run until a topology is first published), CRS_TOPOLOGY_FILE,
CRS_TOPOLOGY_LEASE, CRS_MIGRATION_RATE, CRS_MIGRATION_BATCH, CRS_REINVALIDATE_DELAY.
Exit codes: 0 done, 1 refused or stopped (the message says why and what to do next), 2 bad usage or
configuration (CRS_PG_DSN not set or unusable; a change with a login that is not a member of
crs_operator; CRS_TOPOLOGY_FILE in a directory that does not exist, or not parsing), 3 PostgreSQL or a
Redis shard unreachable, 130 interrupted (a move resumes with apply), 141 standard output closed early.
Runbook: docs/runbooks/resharding.md."""

OVERVIEW = """See and change the Redis shards nodes cache on, without a restart and without a failed lookup.

The topology (shard names, addresses, weights, states) is versioned in PostgreSQL; every node polls
it (CRS_TOPOLOGY_POLL_INTERVAL) and reports the version it runs in a heartbeat. Changing which shards
own which keys is a move in three published steps — preparing, migrating (a warmer copies the keys
that change owner), finishing (the old owners' copies are deleted) — each started only when every
live node runs the previous one. Lookups keep working throughout: reads try the new owner, then the
old one, then PostgreSQL; writes delete on both owners.

Typical session:
  crs shards status                                   what runs now, per shard and per node
  crs shards add shard-4 --address redis://redis-4:6379/0
  crs shards plan                                     keys and bytes each shard gains and loses
  crs shards apply                                    move them (progress bar; Ctrl-C resumes later)
  crs shards abort                                    at any point: back to the ring you started from"""


def weight(text: str) -> int:
    """--weight: a whole number in 1..MAX_WEIGHT, checked while parsing (bad usage, exit 2), before a
    command publishes or stages anything."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to {MAX_WEIGHT}")
    return value


def redis_address(text: str) -> str:
    """A shard's or a copy's address: a redis://, rediss:// or unix:// URL the nodes' clients can use,
    checked while parsing (exit 2), before a probe would call a mistyped one unreachable (exit 3)."""
    from shard_router.topology import TopologyError, check_address

    try:
        check_address("", text)
    except TopologyError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("shard '': ")) from None
    return text


def register(sub: Any) -> None:
    """Add `shards` and its subcommands to the `crs` parser's subcommands."""
    p = sub.add_parser("shards", help="Redis shard topology: status, plan, add/remove/reweight, apply, abort, flush",
                       description=OVERVIEW, epilog=EPILOG, formatter_class=RAW)
    ss = p.add_subparsers(dest="shards_command", required=True, metavar="SHARDS_COMMAND")

    s = ss.add_parser("status", help="the topology, each shard and each node, now", epilog=EPILOG,
                      formatter_class=RAW, description=(
        "Print the topology in force (version, phase, where it is stored) and, per shard: state,\n"
        "address, weight, share of the keyspace, key count and memory (DBSIZE, INFO used_memory), hit\n"
        "ratio (INFO keyspace_hits / (hits + misses) since the shard started), failed operations and\n"
        "how many nodes see it down (from the nodes' heartbeats). Then every live node (heartbeat\n"
        "younger than CRS_TOPOLOGY_LEASE) with the topology version it runs, the progress of a move\n"
        "in progress, and the staged change if any. Read-only. The same numbers are exported by every\n"
        "node as crs_topology_* and crs_cache_shard_* metrics."))
    s.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    s.set_defaults(func=cmd_status)

    s = ss.add_parser("plan", help="how many keys and bytes the staged change moves, before anything moves",
                      epilog=EPILOG, formatter_class=RAW, description=(
        "For the staged change (or the move in progress), show per shard: weight and share of the\n"
        "keyspace before and after, and how many keys and bytes it holds, loses, gains and will hold;\n"
        "the fraction of the keys and of the hash space that changes owner; and which shard sends how\n"
        "many keys to which. Keys are counted on the real shards: SCAN plus MEMORY USAGE on up to\n"
        "--sample keys per shard, extrapolated to DBSIZE (--sample 0 examines every key). The hash\n"
        "space fraction is exact. Read-only: nothing moves until `crs shards apply`."))
    s.add_argument("--sample", type=int, default=DEFAULT_PLAN_SAMPLE, metavar="N",
                   help=f"keys examined per shard (default {DEFAULT_PLAN_SAMPLE}; 0 = all, exact)")
    s.add_argument("--json", action="store_true", help="one JSON object instead of tables (nothing staged and"
                   " no move in progress: keys_moving 0, staged false)")
    s.set_defaults(func=cmd_plan)

    s = ss.add_parser("add", help="stage a new shard (nothing moves until apply)", epilog=EPILOG,
                      formatter_class=RAW, description=(
        "Stage adding shard NAME at --address with --weight to the draft change (create the draft from\n"
        "the topology in force if there is none). Several add/remove/reweight commands build one\n"
        "change, applied together. NAME is the shard's stable identity in the ring (1-63 characters of\n"
        "[a-z0-9.-], e.g. the StatefulSet pod name); the address only says where to reach it. The new\n"
        "shard must be reachable; whatever it holds is flushed when the move starts. Prints the change\n"
        "and the share of the hash space that will move; `crs shards plan` counts real keys."))
    s.add_argument("name", help="shard name, e.g. shard-4")
    s.add_argument("--address", required=True, type=redis_address, help="redis://HOST:PORT/DB of the new shard")
    s.add_argument("--weight", type=weight, default=1, help="relative weight, >= 1 (default 1)")
    s.add_argument("--no-check", action="store_true", help="do not PING the new shard now")
    s.set_defaults(func=cmd_add)

    s = ss.add_parser("remove", help="stage removing a shard (its keys move to the others on apply)",
                      epilog=EPILOG, formatter_class=RAW, description=(
        "Stage removing shard NAME: on apply its keys are copied to their new owners, then deleted\n"
        "from it, and it leaves the topology. Stop its Redis only after `crs shards status` shows a\n"
        "stable version without it on every node."))
    s.add_argument("name")
    s.set_defaults(func=cmd_remove)

    s = ss.add_parser("reweight", help="stage a new weight for a shard", epilog=EPILOG, formatter_class=RAW,
                      description=(
        "Stage changing shard NAME's weight. Note that with ketama (twemproxy's float32 arithmetic)\n"
        "a weight change also moves some keys between the other shards: `crs shards plan` shows them."))
    s.add_argument("name")
    s.add_argument("--weight", type=weight, required=True, help="new relative weight (>= 1)")
    s.set_defaults(func=cmd_reweight)

    s = ss.add_parser("mark", help="take a shard out (down) or put it back (active); no key moves",
                      epilog=EPILOG, formatter_class=RAW, description=(
        "Publish a new version with shard NAME marked down or active, e.g. before maintenance on its\n"
        "Redis. Nodes stop using a down shard (its keys are served from PostgreSQL, never remapped to\n"
        "another shard) and flush it before using it again once it is marked active, since it may\n"
        "have missed deletes meanwhile. Only in a stable topology."))
    s.add_argument("name")
    s.add_argument("state", choices=("down", "active"))
    s.set_defaults(func=cmd_mark)

    s = ss.add_parser("add-replica", help="give a shard another copy (reads fail over to it); no key moves",
                      epilog=EPILOG, formatter_class=RAW, description=(
        "Give shard NAME one more copy at ADDRESS: nodes write every fill and delete to all copies and\n"
        "read from one, failing over to the next (docs/decisions.md, \"Replicated shards\"). Two\n"
        "versions: first the copy is written but not read; once every live node runs that version\n"
        "(--wait-timeout) the copy is flushed, then a second version lets nodes read it. A miss on it\n"
        "then asks a sibling copy and copies the value over, so it refills without loading PostgreSQL.\n"
        "Placement is by shard name, so no key moves. Only in a stable topology. Interrupted, run it\n"
        "again (or remove-replica) to finish."))
    s.add_argument("name")
    s.add_argument("address", type=redis_address, help="redis://[user:password@]host:port/db of the new copy")
    s.add_argument("--no-check", action="store_true", help="do not PING the new copy now")
    s.add_argument("--wait-timeout", type=seconds, help="seconds to wait for nodes at each version"
                   f" (default max({MIN_WAIT_TIMEOUT:g}, {WAIT_LEASES} x CRS_TOPOLOGY_LEASE))")
    s.set_defaults(func=cmd_replica)

    s = ss.add_parser("remove-replica", help="take a copy away from a shard; no key moves", epilog=EPILOG,
                      formatter_class=RAW, description=(
        "Take the replica at ADDRESS away from shard NAME in two versions: first nodes stop reading it\n"
        "(and still delete on it); once every live node runs that version (--wait-timeout), a second\n"
        "version drops it. Stop that Redis once the command has finished. Only in a stable topology.\n"
        "Interrupted, run it again to finish."))
    s.add_argument("name")
    s.add_argument("address")
    s.add_argument("--wait-timeout", type=seconds, help="seconds to wait for nodes at each version"
                   f" (default max({MIN_WAIT_TIMEOUT:g}, {WAIT_LEASES} x CRS_TOPOLOGY_LEASE))")
    s.set_defaults(func=cmd_replica)

    s = ss.add_parser("apply", help="start the staged change and move the keys (resumable)", epilog=EPILOG,
                      formatter_class=RAW, description=(
        "Publish the staged change as the first step of a move and drive it to a stable topology:\n"
        "  preparing  every node deletes on both owners; the joining shards are flushed\n"
        "  migrating  reads try the new owner, then the old; the warmer copies every key that changes\n"
        "             owner (SCAN the old owner, GET + PTTL, SET NX with the remaining TTL), paced to\n"
        "             --rate keys per second, with a progress bar\n"
        "  finishing  reads use the new owner only; the moved keys are deleted from their old owners\n"
        "  stable     the new ring alone\n"
        "Before each step it waits until every live node runs the previous version (--wait-timeout).\n"
        "Progress is saved after every batch: after Ctrl-C, a crash or a timeout, run apply again to\n"
        "resume where it stopped. Without a staged change it resumes the move in progress."))
    s.add_argument("--rate", type=int,
                   help=f"keys examined per second (default CRS_MIGRATION_RATE = {Settings.migration_rate})")
    s.add_argument("--batch", type=int,
                   help=f"keys per SCAN step (default CRS_MIGRATION_BATCH = {Settings.migration_batch})")
    s.add_argument("--wait-timeout", type=seconds, help="seconds to wait for nodes at each step"
                   f" (default max({MIN_WAIT_TIMEOUT:g}, {WAIT_LEASES} x CRS_TOPOLOGY_LEASE))")
    s.set_defaults(func=cmd_apply)

    s = ss.add_parser("abort", help="discard the staged change, or take the move in progress back", epilog=EPILOG,
                      formatter_class=RAW, description=(
        "Safe at any point. Discards the staged change. During a move: in preparing, the old ring is\n"
        "stable again at once; in migrating or finishing, the way back is itself a finishing step\n"
        "(reads go to the old owners only, deletes to both; then the copies made on the new owners\n"
        "are deleted) ending in the old ring, stable. A running `apply` notices, stops after its\n"
        "current batch, and this command takes over. Interrupted, it resumes with `crs shards apply`."))
    s.add_argument("--rate", type=int, help="keys examined per second (default CRS_MIGRATION_RATE)")
    s.add_argument("--batch", type=int, help="keys per SCAN step (default CRS_MIGRATION_BATCH)")
    s.add_argument("--wait-timeout", type=seconds, help="seconds to wait for nodes at each step")
    s.set_defaults(func=cmd_abort)

    s = ss.add_parser("flush", help="empty every copy of every shard (after a PostgreSQL restore)", epilog=EPILOG,
                      formatter_class=RAW, description=(
        "FLUSHDB on every copy of every shard in the topology in force (the bootstrap ring when none\n"
        "was published). For after a PostgreSQL restore, or a failover that lost commits: the shards\n"
        "still hold answers read from the history that was lost, and nothing else deletes them\n"
        "(docs/deploy.md, section 3). Run it once the restored database takes connections. Every\n"
        "lookup then misses once and loads from PostgreSQL: on a busy system that is a wave of reads.\n"
        "Moves no key and publishes nothing; safe during a move (the keys are only a cache). A copy\n"
        "that does not answer is reported and the others are still flushed: exit 3, run it again."))
    s.add_argument("--yes", action="store_true", required=True,
                   help="required: every cached answer is dropped (`crs shards status` lists the copies)")
    s.set_defaults(func=cmd_flush)

    s = ss.add_parser("history", help="the last topology versions, who published them and why", epilog=EPILOG,
                      formatter_class=RAW, description=(
        "List the most recent topology versions, newest first: version, phase, target ring, when and\n"
        "by which database role each was published, and why (seeded from CRS_REDIS_SHARDS, a step of\n"
        "apply or abort, mark). The table is append-only: the highest version is the one in force.\n"
        "To go back to an older ring after a finished move, stage it again with add/remove/reweight."))
    s.add_argument("--limit", type=at_least_one, default=DEFAULT_HISTORY_LIMIT,
                   help=f"versions to show (default {DEFAULT_HISTORY_LIMIT})")
    s.set_defaults(func=cmd_history)
