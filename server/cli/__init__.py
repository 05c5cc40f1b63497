"""`crs`: the product's command line. Thin: parse, build settings, hand off.

One module per command family: main (the parser and exit codes), serve (serve, migrate), keys,
audit, lookup (and the connection arguments every command that calls a node shares), export (a
consistent extract from a Snapshot), feed (feed tail), shards (its parser and manuals; the bodies in
shards_commands, its text in shards_render); render draws tables, sizes and percentages for all of them. Development
commands (the embedded stack, demo data, dev certificates) live in `crs-dev` (devstack/cli.py) and
the capacity model in `crs-load` (loadtests/): the product imports neither.
"""

from server.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
