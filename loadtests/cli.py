"""`crs-load`: the load tests' and the capacity planner's commands (the product's `crs` never imports loadtests/).

    crs-load capacity --target N ...   the capacity model (loadtests/sweep/capacity.py)
    crs-load sweep [ARGS]              = python -m loadtests.sweep
    crs-load bench [ARGS]              = python -m loadtests.bench (./crsw bench)
    crs-load identity-people|identity-quality|identity-train   generated people, the identity model's
                                       quality benchmark and training (loadtests/identity/)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from loadtests.identity import people, quality, train
from loadtests.sweep import capacity
from server.cli.base import run_command


def _sweep(argv: Sequence[str]) -> int:
    from loadtests.sweep.run import main

    return main(argv)


def _bench(argv: Sequence[str]) -> int:
    from loadtests.bench.run import main

    return main(argv)


def _identity_bench(argv: Sequence[str]) -> int:
    from loadtests.bench.identity import main

    return main(argv)


def _identity_import(argv: Sequence[str]) -> int:
    from loadtests.bench.identity_import import main

    return main(argv)


# Commands with a parser of their own: everything after the name goes to their main(argv).
RUNNERS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "sweep": (_sweep, "the scaling sweep (python -m loadtests.sweep); --help for its options"),
    "bench": (_bench, "the benchmark (python -m loadtests.bench, ./crsw bench); --help for its options"),
    "identity-bench": (_identity_bench, "bulk import rows/s and IdentifyCustomer p50/p99 at 100k and 1M customers"),
    "identity-import": (_identity_import, "bulk import rows/s and CPU into a preloaded database, repeatable (A/B)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crs-load", description="CRS Lookup load tests and capacity planning.",
                                epilog="docs/loadtests.md is the manual.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    capacity.register(sub)
    for module in (people, quality, train):
        module.register(sub)
    for name, (_, help_text) in RUNNERS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in RUNNERS:
        return RUNNERS[args_list[0]][0](args_list[1:])
    return run_command(build_parser(), args_list)


if __name__ == "__main__":
    raise SystemExit(main())
