"""The `crs` parser: every command family registers its sub-commands; errors become exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from server.cli import audit, bins, export, feed, identity, imports, keys, lookup, pci, serve, shards
from server.cli.base import run_command

EPILOG = """Configuration comes from CRS_* environment variables and/or a TOML file (--config or
CRS_CONFIG); README.md lists every setting. Exit codes: 0 ok, 1 refused or not finished (the message
says why and what to do next), 2 bad usage or configuration (a setting missing or malformed, a key
that is not the database's, a database login without the rights the command needs), 3 a dependency
(PostgreSQL, Redis) unavailable, 130 interrupted (Ctrl-C or SIGINT, which stops every command, also
one started with SIGINT ignored, as a background job of a script is), 141 standard output closed
early (`crs ... | head`): the command stops without a word. Development commands (a local stack, demo
data, dev certificates) are in `crs-dev --help`; the capacity model in `crs-load --help`."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crs", description="CRS Lookup: card -> account -> customer resolution.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML settings file (same names as the CRS_* variables, lower case)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in (serve, audit, keys, lookup, export, feed, identity, shards, bins, imports, pci):
        family.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
