"""`crs keys ...`: fresh keys, online fingerprint-key and KEK rotation, which versions rows use."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from server.cli.base import RAW, at_least_one, number, postgres_errors, settings_from_args


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from server.crypto import generate_keys

    print("# Fresh random keys. Keep them in your secret store, never in the repository.")
    for name, value in generate_keys().items():
        print(f"{name}={value}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from server import rotation
    from server.crypto import KeyConfigError

    settings = settings_from_args(args)
    try:
        with postgres_errors(settings.pg_dsn):
            if args.keys_command == "rotate-fingerprint":
                done, left = asyncio.run(rotation.rotate_fingerprint(
                    settings.pg_dsn, settings.keyring(), to_version=args.to, batch=args.batch,
                    lock_wait=args.lock_wait))
                print(f"re-fingerprinted {done['cards']} cards, {done['accounts']} accounts and"
                      f" {done['source_records']} identity records with version {args.to}")
                if any(left.values()):
                    print(f"crs keys: not done: {left['cards']} cards, {left['accounts']} accounts and"
                          f" {left['source_records']} identity records still have no version {args.to} fingerprint"
                          f" (a write held them locked for longer than --lock-wait {args.lock_wait:g}s). Do not"
                          f" switch nodes to version {args.to} yet: run `crs keys rotate-fingerprint --to {args.to}`"
                          " again (it takes only the rows left), then check `crs keys status`", file=sys.stderr)
                    return 1
            elif args.keys_command == "retire-fingerprint":
                moved, left = asyncio.run(rotation.retire_fingerprint(
                    settings.pg_dsn, version=args.version, batch=args.batch, lock_wait=args.lock_wait))
                if any(left.values()):
                    print(f"crs keys: not done: {left['cards']} cards, {left['accounts']} accounts and"
                          f" {left['source_records']} identity records still use version {args.version} (a write"
                          f" held them locked for longer than --lock-wait {args.lock_wait:g}s, or a node still on"
                          f" version {args.version} wrote them: `crs keys status`). Keep the key configured and"
                          f" run `crs keys retire-fingerprint --version {args.version}` again (it takes only the"
                          " rows left)", file=sys.stderr)
                    return 1
                print(f"version {args.version} retired: {moved['cards']} cards and {moved['accounts']} accounts now"
                      " use their newer fingerprint; remove the key from CRS_FINGERPRINT_KEYS")
            elif args.keys_command == "rotate-kek":
                n = asyncio.run(rotation.rotate_kek(settings.pg_dsn, settings.keyring()))
                print(f"re-wrapped {n} data key(s) under KEK version {settings.kek_version};"
                      " CRS_KEK_PREVIOUS can now be removed")
            else:
                for table, line in asyncio.run(rotation.key_status(settings.pg_dsn)):
                    print(f"{table:12} {line}")
    except KeyConfigError as exc:
        print(f"crs keys: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, rotation.RetireRefused) else 2
    return 0


EPILOG = """Exit codes: 0 done, 1 refused or not done (retire-fingerprint while rows still lack a newer
fingerprint: nothing changed, run rotate-fingerprint first; rotate- or retire-fingerprint that left
rows a write held locked past --lock-wait: it says how many, run it again), 2 bad usage or configuration
(a key missing or malformed, a version that is not configured; retire-fingerprint of a version
never configured here that no row uses: nothing to retire), 3 PostgreSQL unavailable,
130 interrupted (rotations resume where they stopped)."""


def _batches(k: Any) -> None:
    """The options of the commands that go through every row in batches."""
    k.add_argument("--batch", type=at_least_one, default=1000, help="rows per transaction (default 1000)")
    k.add_argument("--lock-wait", type=number(0, unit="seconds"), default=30.0, metavar="SECONDS",
                   help="after the pass, how long to wait for the rows of each table a write held locked"
                        " (default 30)")


def register(sub: Any) -> None:
    s = sub.add_parser("keys", help="key utilities", epilog=EPILOG, formatter_class=RAW)
    ks = s.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    k = ks.add_parser("generate", help="print fresh random CRS_FINGERPRINT_KEYS and CRS_KEK values")
    k.set_defaults(func=cmd_keys_generate)
    k = ks.add_parser("rotate-fingerprint", help="give every card and account a fingerprint under a new key",
                      description=(
        "Online and resumable: decrypts each stored number and writes its fingerprint under key version\n"
        "--to next to the current one, in batches, showing progress; lookups by either version keep\n"
        "working. Rows a concurrent write holds locked are skipped, then taken again after the pass,\n"
        "waiting for their locks up to --lock-wait per table; it exits 0 only when every row has the new\n"
        "fingerprint (else 1, saying how many are left: run it again). Run it with the new version\n"
        "configured in CRS_FINGERPRINT_KEYS (nodes too, still on CRS_FINGERPRINT_KEY_VERSION=OLD), then,\n"
        "once it exits 0, switch nodes to CRS_FINGERPRINT_KEY_VERSION=NEW, then retire-fingerprint the\n"
        "old version.\n"
        "Runbook: docs/security.md."), epilog=EPILOG, formatter_class=RAW)
    k.add_argument("--to", type=int, required=True, help="the new fingerprint key version")
    _batches(k)
    k.set_defaults(func=cmd_keys)
    k = ks.add_parser("retire-fingerprint", help="promote the newer fingerprints and retire a key version",
                      description=(
        "Make every row's newer fingerprint its primary one and mark --version retired. Refuses while\n"
        "any row still lacks a newer fingerprint (run rotate-fingerprint again first): exit 1, nothing\n"
        "changed. Online and resumable, in batches of --batch rows (each its own transaction: a write\n"
        "waits for one batch at most; lookups find every row throughout); rows a write holds locked are\n"
        "taken after the pass, waiting up to --lock-wait per table, and it marks the version retired\n"
        "only when no row is left (else exit 1, saying how many: run it again). A version never\n"
        "configured here that no row uses has nothing to retire: exit 2, with the versions there are."),
        epilog=EPILOG, formatter_class=RAW)
    k.add_argument("--version", type=int, required=True, help="the fingerprint key version to retire")
    _batches(k)
    k.set_defaults(func=cmd_keys)
    k = ks.add_parser("rotate-kek", help="re-wrap every data key under the current KEK", description=(
        "Set CRS_KEK/CRS_KEK_VERSION to the new key-encryption key and CRS_KEK_PREVIOUS/\n"
        "CRS_KEK_PREVIOUS_VERSION to the old one (nodes too), run this, then remove the old key.\n"
        "Card and account rows are not touched: only the wrapped data keys change."), epilog=EPILOG,
        formatter_class=RAW)
    k.set_defaults(func=cmd_keys)
    k = ks.add_parser("status", help="which key versions the stored rows use", epilog=EPILOG, formatter_class=RAW)
    k.set_defaults(func=cmd_keys)
