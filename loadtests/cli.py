"""`crs-load`: the capacity planner's commands (the product's `crs` never imports loadtests/)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loadtests.sweep import capacity


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crs-load", description="CRS Lookup load tests and capacity planning.",
                                epilog="The benchmark is `./crsw bench`, the sweep `python -m loadtests.sweep`;"
                                       " docs/loadtests.md is the manual.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    capacity.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
