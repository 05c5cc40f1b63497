"""`python -m loadtests.bench` (also `./crsw bench`): how fast one node core serves lookups.

Run with --help for the manual; docs/benchmarks/README.md explains the method.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from loadtests.bench.feed import FeedWatchers
from loadtests.bench.report import console_table, evaluate_targets, markdown, merge_rounds, to_json
from loadtests.shared import procs
from loadtests.shared.machine import cpu_model, git_commit, kernel, utc_now
from loadtests.shared.paths import BENCHMARKS_DIR, REPO

DEFAULT_OUT = BENCHMARKS_DIR
RESOLVE_CARD = "/crs.v1.LookupService/ResolveCard"


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    kind: str            # loadgen kind: unary, batch, stream, asyncpg
    target: str          # which server: echo, echo_sync, l1, l2, l3, mtls (+ "_hybrid"), or pg
    unit: str = "lookups"
    client: str = ""     # unary client override ("threads" for the reference run)
    reference: bool = False
    paced_from: str = ""  # unary at half of the rate this phase (same server, saturated) reached in the round


MODELS = ("aio", "hybrid")   # the node's serving models (CRS_SERVING_MODEL), measured side by side


def _node_phases(model: str) -> tuple[Phase, ...]:
    x = "" if model == "aio" else f"_{model}"
    return (
        Phase(f"l1{x}", f"ResolveCard, near-cache hit [{model}]", "unary", f"l1{x}"),
        Phase(f"l1_half{x}", f"ResolveCard, near-cache, half of saturation [{model}]", "unary", f"l1{x}",
              paced_from=f"l1{x}"),
        Phase(f"l1_mtls{x}", f"ResolveCard, near-cache, mutual TLS [{model}]", "unary", f"mtls{x}"),
        Phase(f"batch{x}", f"BatchResolve x100, near-cache [{model}]", "batch", f"l1{x}", unit="keys"),
        Phase(f"stream{x}", f"StreamResolve, near-cache [{model}]", "stream", f"l1{x}"),
        Phase(f"l2{x}", f"ResolveCard, Redis hit (L1 off) [{model}]", "unary", f"l2{x}"),
        Phase(f"l3{x}", f"ResolveCard, PostgreSQL (caches off) [{model}]", "unary", f"l3{x}"),
    )


PHASES = (
    Phase("echo", "grpc.aio echo server (ceiling)", "unary", "echo"),
    Phase("echo_sync", "sync grpc.server echo (hybrid ceiling)", "unary", "echo_sync"),
    Phase("echo_half", "grpc.aio echo, half of saturation", "unary", "echo", paced_from="echo"),
    Phase("echo_sync_half", "sync grpc.server echo, half of saturation", "unary", "echo_sync",
          paced_from="echo_sync"),
    Phase("echo_stream", "grpc.aio echo, StreamResolve (streams' ceiling)", "stream", "echo"),
    Phase("echo_sync_stream", "sync grpc.server echo, StreamResolve (hybrid streams' ceiling)", "stream",
          "echo_sync"),
    Phase("echo_threads", "echo server, sync-thread client (ref.)", "unary", "echo", client="threads",
          reference=True),
    *(ph for model in MODELS for ph in _node_phases(model)),
    Phase("asyncpg", "asyncpg card-row query, no service", "asyncpg", "pg"),
    Phase("asyncpg_join", "asyncpg, the node's full card query", "asyncpg", "pg"),
)
PHASE_KEYS = tuple(p.key for p in PHASES)

DESCRIPTION = """\
Measure, in one run on this machine, how many lookups per second one CRS node core serves, next to
the ceiling of a bare grpc.aio server, and print PASS/MISS against the targets.

The run starts its own PostgreSQL and Redis shards (devstack/, as `crs-dev up` does), loads a small
demo data set, starts node processes (`crs serve`, workers=1, plaintext unless stated) in both
serving models (CRS_SERVING_MODEL=aio and hybrid; the hybrid phases carry the suffix _hybrid) and two
bare echo servers, then measures each phase after --warmup seconds of the same load:

  echo          bare grpc.aio unary server on uvloop answering canned bytes the size of a ResolveCard
                answer (loadtests/bench/echo_server.py): the ceiling
  echo_sync     the same on the synchronous grpc.server (the node's default thread count): the hybrid ceiling
  echo_half, echo_sync_half
                each echo paced at half the rate it reached saturated in the same round: the latency
                floor of each serving model's gRPC layer on this machine, next to l1_half
  echo_stream, echo_sync_stream
                each echo answering StreamResolve keys with canned answers (one thread per stream on
                the sync server): the streams' ceiling, so the stream target's ratio can be read
                against what each gRPC server itself reaches (the report's "Ceilings" lines)
  echo_threads  the aio echo, driven by the sync-thread client instead (reference: which client saturates)
  l1            ResolveCard answered from the near-cache (the same --hot-keys PANs over and over)
  l1_half       the same, paced at half the rate l1 reached in the same round: latency below saturation
  l1_mtls       l1 on a node serving mutual TLS (dev PKI, the client presents a certificate): the
                price of production transport security next to l1's plaintext
  batch         BatchResolve with --batch-size keys per call from the near-cache (keys/s)
  stream        StreamResolve: lookups over open bidi streams from the near-cache
  l2            ResolveCard answered from Redis (a node with near_cache_size=0)
  l3            ResolveCard answered from PostgreSQL (near_cache_size=0, no Redis shards); all demo
                cards in turn, so concurrent calls never share a key
  asyncpg       no service at all: asyncpg PK lookups of the card row
                (SELECT ... FROM cards WHERE fingerprint_version=$1 AND pan_fingerprint=$2)
  asyncpg_join  the same, with the query the node itself runs on a miss (card + account + related
                customers as JSON, server/store/reads.py): the whole answer, still without the service

The phases run in --rounds rounds (default 3; echo_threads only in the first), each round measuring
every phase for --seconds/--rounds. The per-core figure is each phase's best round (interference from
other processes only ever makes a call cost more CPU, as with timeit's minimum); wall-clock rates
pool all rounds. Half the spread between rounds is printed as the noise, and a target within it is
marked "marginal".

The load generator shares the machine with the server, so wall-clock throughput depends on how
much CPU the client takes. The honest figure is work per CPU-second of the SERVER process (read from
/proc/PID/stat at the window's edges): "per server core". All ratios and targets use it. Where
there are at least two CPUs the server side (server + Redis + PostgreSQL) is pinned to the first
CPU and the load generator to the second. In the asyncpg phases the server is PostgreSQL (the
postmaster and all its backends).

Targets (per server core, same run; each serving model judged on its own; issue 12): near-cache hit
>= 1.3x grpc.aio echo and >= 0.85x sync grpc.server echo; Redis hit >= 1.0x grpc.aio echo;
StreamResolve >= 2.5x unary near-cache; BatchResolve(100) keys/s >= 35x grpc.aio echo calls/s;
near-cache p99 <= 2 ms at half of saturation.
"""

EPILOG = """\
Output: a table on stdout, and docs/benchmarks/latest.json + latest.md (--out to change, --no-write
to skip). Exit status: 0 done (whatever the targets say, unless --strict); 1 a phase failed or
answered errors, or --strict and a target missed; 2 bad usage; 3 the environment did not start.

Linux only (/proc, sched_setaffinity). Everything listens on 127.0.0.1 and is stopped at the end,
also on Ctrl-C or SIGTERM. The default run takes about 90 seconds.

Examples:
  python -m loadtests.bench                       # everything, ~90 s
  python -m loadtests.bench --seconds 2 --no-write
  python -m loadtests.bench --phases echo,l1 --client threads --concurrency 8
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--seconds", type=float, default=5.0,
                   help="measured seconds per phase, split over the rounds (default 5)")
    g.add_argument("--rounds", type=int, default=3,
                   help="rounds over all phases, interleaved so drift hits every phase alike; the per-core "
                        "figure is the best round's (default 3)")
    g.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of the same load before each window, not counted (default 1)")
    g.add_argument("--idle-seconds", type=float, default=0.3,
                   help="after each window, seconds of one-call-in-flight latency sampling (default 0.3)")
    g.add_argument("--phases", default=",".join(PHASE_KEYS),
                   help="comma-separated subset of: " + ", ".join(PHASE_KEYS) + " (default: all)")
    g.add_argument("--customers", type=int, default=2000,
                   help="demo customers to load (2 cards each; default 2000)")
    g.add_argument("--hot-keys", type=int, default=256,
                   help="distinct PANs the cache phases cycle through (default 256)")
    g.add_argument("--shards", type=int, default=2, help="Redis shards (default 2)")
    g.add_argument("--pg-binaries", default="auto", choices=("auto", "system", "pgserver"),
                   help="which PostgreSQL binaries devstack/ uses (default auto)")
    g.add_argument("--no-pin", action="store_true", help="do not pin the server and client to separate CPUs")
    g = p.add_argument_group("load generator")
    g.add_argument("--client", choices=("aio", "threads", "h2load"), default="aio",
                   help="client for the unary phases: grpc.aio with --concurrency calls in flight on one "
                        "event loop, --threads sync threads, or h2load (nghttp2's C load generator, "
                        "apt-get install nghttp2-client): --concurrency calls in flight, all for one key, "
                        "so a fast server is saturated by a client that costs little; mutual TLS, PostgreSQL "
                        "and paced (half of saturation) phases keep aio (default aio)")
    g.add_argument("--concurrency", type=int, default=16, help="unary calls in flight, aio client (default 16)")
    g.add_argument("--threads", type=int, default=8, help="threads of the sync client (default 8)")
    g.add_argument("--channels", type=int, default=4, help="gRPC channels (TCP connections) (default 4)")
    g.add_argument("--batch-size", type=int, default=100, help="keys per BatchResolve call (default 100)")
    g.add_argument("--batch-concurrency", type=int, default=8, help="BatchResolve calls in flight (default 8)")
    g.add_argument("--batch-rate", type=float, default=0.0,
                   help="BatchResolve calls a second sent on a schedule whatever the answers (an open loop, as"
                        " traffic arrives; above the node's capacity: overload); 0 = a closed loop of"
                        " --batch-concurrency calls (default)")
    g.add_argument("--deadline", type=float, default=None,
                   help="seconds: each BatchResolve's deadline (default: none); the failed calls are then"
                        " counted by status code")
    g.add_argument("--streams", type=int, default=8, help="open StreamResolve streams (default 8)")
    g.add_argument("--stream-window", type=int, default=16,
                   help="requests outstanding per stream (default 16)")
    g.add_argument("--pg-connections", type=int, default=16,
                   help="connections (one query in flight each) in the asyncpg phase (default 16)")
    g = p.add_argument_group("output")
    g.add_argument("--watchers", type=int, default=0,
                   help="idle ChangeFeedService Watch streams attached to each node during every phase (default 0):"
                        " what following the feed costs the lookup path")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where latest.json/latest.md go "
                                                                 "(default docs/benchmarks)")
    g.add_argument("--no-write", action="store_true", help="print only; write no files")
    g.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    g.add_argument("--verbose", action="store_true", help="show demo-data progress and loadgen stderr")
    args = p.parse_args(argv)
    chosen = [k.strip() for k in args.phases.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in PHASE_KEYS]
    if unknown or not chosen:
        p.error(f"--phases: unknown phase(s) {', '.join(unknown) or '(none given)'}; choose from "
                + ", ".join(PHASE_KEYS))
    args.phase_list = [ph for ph in PHASES if ph.key in chosen]
    for ph in args.phase_list:
        if ph.paced_from and ph.paced_from not in chosen:
            p.error(f"--phases: {ph.key} is paced from {ph.paced_from}'s rate: choose both")
    for name in ("seconds", "warmup", "idle_seconds"):
        if getattr(args, name) < 0 or (name == "seconds" and args.seconds <= 0):
            p.error(f"--{name.replace('_', '-')} must be {'> 0' if name == 'seconds' else '>= 0'}")
    for name in ("rounds", "customers", "hot_keys", "concurrency", "threads", "channels", "batch_size",
                 "batch_concurrency", "streams", "stream_window", "pg_connections"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.batch_rate < 0 or (args.deadline is not None and args.deadline <= 0):
        p.error("--batch-rate must be >= 0 and --deadline > 0")
    if args.shards < 1:
        p.error("--shards must be >= 1 (the Redis phase needs a shard)")
    if args.watchers < 0:
        p.error("--watchers must be >= 0")
    if args.hot_keys > 2 * args.customers:
        p.error(f"--hot-keys {args.hot_keys} exceeds the {2 * args.customers} demo cards")
    if args.stream_window > args.hot_keys:
        p.error("--stream-window must be <= --hot-keys (correlation ids must be unique in flight)")
    if args.batch_size > 1000:
        p.error("--batch-size must be <= 1000 (the node's batch_max)")
    return args


# -- environment -----------------------------------------------------------------------------------
def choose_cpus(no_pin: bool) -> tuple[set[int], set[int]] | None:
    if no_pin or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, {cpus[1]}


class EchoServer:
    def __init__(self, payload: Path, log: Path, *, sync: bool = False) -> None:
        self.log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtests.bench.echo_server", "--port", "0",
                                      "--payload", str(payload), *(["--sync"] if sync else [])], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        self.port = self._wait_ready(30.0)

    def _wait_ready(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 256)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in buf:
                    word, _, port = buf.split(b"\n")[0].partition(b" ")
                    if word == b"READY":
                        return int(port)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"echo server did not start (see {self.log.name})")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def start_node_without_redis(env: Any, **overrides: object) -> Any:
    """A node with redis_shards=() (caches off). DevEnvironment.start_node(redis_shards=()) raises
    TypeError (its settings() sets redis_shards itself, then the override again), so this builds
    the settings the same way and starts the node with devstack.environment.start_node."""
    import dataclasses

    from devstack import free_port
    from devstack.environment import start_node

    settings = dataclasses.replace(env.settings(grpc_port=free_port(), workers=1, metrics_port=free_port(),
                                                **overrides), redis_shards=())
    log_dir = Path(env.stack.base_dir) / "logs"
    log_dir.mkdir(exist_ok=True)
    extra = {"pki": env.pki} if getattr(env, "pki", None) is not None else {}
    node = start_node(settings, log_path=log_dir / f"node-{settings.grpc_port}.log", **extra)
    env.nodes.append(node)   # env.stop() stops it
    return node


def bench_pki(directory: Path) -> Any:
    """A dev PKI and clients file for the mutual-TLS phases: the client presents the "switch" certificate."""
    from devstack.environment import dev_clients_config
    from devstack.pki import write_dev_pki

    pki = write_dev_pki(directory, ("admin", "switch"))
    (directory / "clients.json").write_text(json.dumps(dev_clients_config(), indent=2))
    return pki


def start_mtls_node(env: Any, pki: Any, **overrides: object) -> Any:
    """A node serving mutual TLS only, as in production (no anonymous callers)."""
    return env.start_node(workers=1, pki=pki, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                          tls_client_ca_file=str(pki.ca_cert), clients_file=str(pki.directory / "clients.json"),
                          allow_plaintext=False, allow_anonymous=False, **overrides)


def fetch_answer(address: str, pan: str) -> bytes:
    """The serialized ResolveCard answer the node gives for `pan` (the echo server's payload)."""
    import grpc

    from server.proto import crs_pb2 as pb

    with grpc.insecure_channel(address) as channel:
        raw: bytes = channel.unary_unary(RESOLVE_CARD)(pb.ResolveCardRequest(pan=pan).SerializeToString(),
                                                       timeout=10)
    pb.Resolution.FromString(raw)
    return raw


def machine_info(settings: Any, stack: Any, cpus: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    import asyncpg
    import google.protobuf
    import grpc
    import redis
    import uvloop

    info: dict[str, Any] = {"date": utc_now(), "cpu_model": cpu_model(), "cores": os.cpu_count(), "kernel": kernel()}
    info["python"] = f"{platform.python_implementation()} {platform.python_version()}"
    info["grpcio"] = grpc.__version__
    info["protobuf"] = google.protobuf.__version__
    info["uvloop"] = getattr(uvloop, "__version__", "unknown")
    info["asyncpg"] = asyncpg.__version__

    async def pg_version() -> str:
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    try:
        info["postgresql"] = asyncio.run(pg_version())
    except Exception as exc:  # informational only
        info["postgresql"] = f"unknown ({type(exc).__name__})"
    try:
        client = redis.Redis.from_url(next(iter(stack.shard_urls().values())))
        info["redis"] = client.info("server")["redis_version"]
        client.close()
    except Exception as exc:
        info["redis"] = f"unknown ({type(exc).__name__})"
    info["pinning"] = ("off" if cpus is None else
                       f"server side (server, Redis, PostgreSQL) on CPU {min(cpus[0])}, "
                       f"load generator on CPU {min(cpus[1])}")
    info["load_average_at_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["commit"] = git_commit(mark_dirty=True)
    return info


# -- phases ----------------------------------------------------------------------------------------
def run_loadgen(spec: dict[str, Any], *, timeout: float, verbose: bool) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "loadtests.bench.loadgen"], input=json.dumps(spec), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if verbose and proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"load generator exited with {proc.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


SERVER_NAMES = {"echo": "grpc.aio echo server process", "echo_sync": "sync grpc.server echo server process",
                "pg": "PostgreSQL (postmaster + backends)"}


def server_name(target: str) -> str:
    return SERVER_NAMES.get(target, "node process")


def phase_spec(phase: Phase, args: argparse.Namespace, *, window: float, cpus: tuple[set[int], set[int]] | None,
               hot: list[int], cards: int) -> dict[str, Any]:
    """The load generator's spec for one phase, less where to send it (target, pids)."""
    spec: dict[str, Any] = {
        "kind": phase.kind, "warmup": args.warmup, "seconds": window, "idle_seconds": args.idle_seconds,
        "channels": args.channels, "client_cpus": sorted(cpus[1]) if cpus else [],
        "server_cpus": sorted(cpus[0]) if cpus else [],
        # PostgreSQL phases walk every card: concurrent calls never share a key (no single-flight help).
        "keys": list(range(cards)) if phase.target.startswith(("l3", "pg")) else hot,
    }
    client = phase.client or args.client
    if client == "h2load" and (phase.target.startswith("mtls") or phase.target.startswith("l3") or phase.paced_from):
        # h2load sends no client certificate and one key (PostgreSQL phases walk every card), and its
        # --rps sends in bursts (a timer tick releases every request due: gaps p99 ~10 ms measured),
        # which is no "half of saturation" latency: those phases keep the aio client's even schedule.
        client = "aio"
    if phase.kind == "unary":
        spec.update(client=client, concurrency=args.threads if client == "threads" else args.concurrency)
    elif phase.kind == "batch":
        spec.update(concurrency=args.batch_concurrency, batch_size=args.batch_size, rate=args.batch_rate or None,
                    deadline=args.deadline)
    elif phase.kind == "stream":
        spec.update(streams=args.streams, window=args.stream_window)
    else:
        spec.update(concurrency=args.pg_connections)
    return spec


def describe_load(phase: Phase, spec: dict[str, Any]) -> str:
    if phase.kind == "unary" and spec.get("client") == "threads":
        return f"sync client, {spec['concurrency']} threads, {spec['channels']} channels"
    if phase.kind == "unary" and spec.get("client") == "h2load":
        return f"h2load, {spec['concurrency']} in flight, {spec['channels']} connections, one key"
    if phase.kind == "unary" and phase.paced_from:
        return f"aio client, paced to {spec['rate']:,.0f} calls/s, {spec['channels']} channels"
    if phase.kind == "unary":
        return f"aio client, {spec['concurrency']} in flight, {spec['channels']} channels"
    if phase.kind == "batch":
        deadline = f", {spec['deadline']:g} s deadline" if spec.get("deadline") else ""
        if spec.get("rate"):
            return (f"aio, open loop: {spec['rate']:g} batches of {spec['batch_size']} a second, "
                    f"{spec['channels']} channels{deadline}")
        return (f"aio, {spec['concurrency']} batches of {spec['batch_size']} in flight, "
                f"{spec['channels']} channels{deadline}")
    if phase.kind == "stream":
        return (f"aio, {spec['streams']} streams x {spec['window']} outstanding, "
                f"{spec['channels']} channels")
    return f"asyncpg, {spec['concurrency']} connections, prepared statement"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/stat").exists():
        print("benchmark: needs Linux (/proc) to read process CPU time", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    cpus = choose_cpus(args.no_pin)
    if cpus is not None:
        procs.pin_self(cpus[1])   # the orchestrator idles on the client CPU; children inherit it

    from devstack.demo import demo_pan
    from devstack.environment import DevEnvironment
    from server.logs import configure_logging
    from server.store.reads import CARD_BY_FINGERPRINT_SQL as card_query

    configure_logging("WARNING")
    started = time.monotonic()
    quiet: TextIO = sys.stderr if args.verbose else open(os.devnull, "w")
    env = DevEnvironment(shards=args.shards, customers=args.customers, pg_binaries=args.pg_binaries)
    echoes: dict[str, EchoServer] = {}
    watchers: FeedWatchers | None = None
    rounds: dict[str, list[dict[str, Any]]] = {}
    loads: dict[str, str] = {}
    failures: list[str] = []
    try:
        print(f"benchmark: starting PostgreSQL + {args.shards} Redis shard(s), loading {args.customers} demo "
              "customers ...", flush=True)
        try:
            settings = env.start(out=quiet)
        except Exception as exc:
            print(f"benchmark: the environment did not start: {exc}", file=sys.stderr)
            return 3
        assert env.stack is not None
        cards = 2 * args.customers
        targets_needed = {ph.target for ph in args.phase_list}
        if targets_needed & {"echo", "echo_sync"}:
            targets_needed.add("l1")   # the echo payload is a real answer
        nodes: dict[str, Any] = {}
        pki = None
        for target in sorted(targets_needed):
            tier, _, model = target.partition("_")
            model = model or "aio"
            if tier == "l1":
                nodes[target] = env.start_node(workers=1, serving_model=model)
            elif tier == "l2":
                nodes[target] = env.start_node(workers=1, near_cache_size=0, serving_model=model)
            elif tier == "l3":
                nodes[target] = start_node_without_redis(env, near_cache_size=0, serving_model=model)
            elif tier == "mtls":
                pki = pki or bench_pki(Path(env.stack.base_dir) / "bench-pki")
                nodes[target] = start_mtls_node(env, pki, serving_model=model)
        if targets_needed & {"echo", "echo_sync"}:
            payload = fetch_answer(nodes["l1"].address, demo_pan(0))
            payload_path = Path(env.stack.base_dir) / "echo-payload.bin"
            payload_path.write_bytes(payload)
            for target in sorted(targets_needed & {"echo", "echo_sync"}):
                echoes[target] = EchoServer(payload_path, Path(env.stack.base_dir) / "logs" / f"{target}.log",
                                            sync=target == "echo_sync")
            print(f"benchmark: echo servers answer {len(payload)} bytes, the size of a ResolveCard answer",
                  flush=True)
            if "l1" not in {ph.target for ph in args.phase_list}:
                nodes.pop("l1").stop()   # started only to get a real answer for the echo payload
        if args.watchers:
            watchers = FeedWatchers([n.address for t, n in nodes.items() if not t.startswith("mtls")],
                                    per_node=args.watchers)
            print(f"benchmark: {args.watchers} Watch stream(s) attached to each node", flush=True)
        machine = machine_info(settings, env.stack, cpus)
        backends = [pid for pid in [env.stack.postgres.pid, *(r.pid for r in env.stack.redis)] if pid]
        hot = list(range(args.hot_keys))
        keyring = settings.keyring()
        schedule = [(rnd, ph) for rnd in range(1, args.rounds + 1) for ph in args.phase_list
                    if rnd == 1 or not ph.reference]
        window = args.seconds / args.rounds
        print(f"benchmark: ready in {time.monotonic() - started:.1f}s; {len(schedule)} runs ({args.rounds} round(s)) "
              f"of {args.warmup:g}s warm-up + {window:g}s measured + {args.idle_seconds:g}s idle latency", flush=True)
        for n, (rnd, phase) in enumerate(schedule, 1):
            spec = phase_spec(phase, args, window=window, cpus=cpus, hot=hot, cards=cards)
            if phase.paced_from:   # half of what the same server reached at saturation in this round
                saturated = rounds.get(phase.paced_from, [])
                if len(saturated) < rnd:
                    failures.append(f"{phase.key} (round {rnd}): no saturation run of its server to pace from")
                    continue
                spec["rate"] = 0.5 * saturated[rnd - 1]["items"] / saturated[rnd - 1]["wall_s"]
            if phase.target in echoes:
                echo = echoes[phase.target]
                spec.update(target=echo.address, server_pids=[echo.proc.pid], backend_pids=[])
            elif phase.target == "pg":
                spec.update(server_pids=[env.stack.postgres.pid], backend_pids=[], dsn=settings.pg_dsn,
                            sql=card_query if phase.key == "asyncpg_join" else None,
                            fingerprint_version=keyring.fingerprint_version,
                            fingerprints=[keyring.fingerprint(demo_pan(i)).hex() for i in spec["keys"]])
            else:
                node = nodes[phase.target]
                spec.update(target=node.address, server_pids=[node.proc.pid], backend_pids=backends,
                            metrics_url=f"http://127.0.0.1:{node.settings.metrics_port}/metrics")
                if phase.target.startswith("mtls") and pki is not None:
                    cert, key = pki.client_cert("switch")
                    spec["tls"] = {"ca": str(pki.ca_cert), "cert": str(cert), "key": str(key)}
            print(f"[{n}/{len(schedule)}] round {rnd}: {phase.title} ...", end=" ", flush=True)
            # The other nodes and echo servers sleep through this phase: idle, each still woke for its
            # pollers, relay and health, on the server core, and their wake-ups were in every latency.
            others = [s.proc.pid for s in (*nodes.values(), *echoes.values()) if s.proc.pid not in spec["server_pids"]]
            try:
                with procs.paused(others):
                    raw = run_loadgen(spec, timeout=args.warmup + window + args.idle_seconds + 60,
                                      verbose=args.verbose)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                print("FAILED")
                failures.append(f"{phase.key} (round {rnd}): {exc}")
                print(f"    {exc}", file=sys.stderr)
                continue
            rounds.setdefault(phase.key, []).append(raw)
            loads[phase.key] = describe_load(phase, spec)
            if raw["errors"]:
                codes = ", ".join(f"{n} {c}" for c, n in sorted(raw.get("failure_codes", {}).items()))
                failures.append(f"{phase.key} (round {rnd}): {raw['errors']} error(s)"
                                f"{f' ({codes} calls)' if codes else ''}, e.g. {raw.get('error_sample')}")
            wall, per_core = raw["items"] / raw["wall_s"], raw["items"] / max(raw["server_cpu_s"], 1e-9)
            print(f"{wall:,.0f} {phase.unit}/s wall, {per_core:,.0f} per server core "
                  f"(server CPU {100 * raw['server_cpu_s'] / raw['wall_s']:.0f}%)"
                  + (f", {raw['errors']} ERRORS" if raw["errors"] else ""), flush=True)
            # A node is done after its last phase: stop it so it does not share the server CPU.
            later = {ph.target for _, ph in schedule[n:]}
            if phase.target in nodes and phase.target not in later:
                nodes[phase.target].stop()
    except KeyboardInterrupt:
        print("\nbenchmark: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        if watchers is not None:
            watchers.stop()
        for echo in echoes.values():
            echo.stop()
        env.stop()
        if quiet is not sys.stderr:
            quiet.close()

    results = [merge_rounds(rounds[ph.key], key=ph.key, title=ph.title, unit=ph.unit,
                            server=server_name(ph.target), load=loads[ph.key], reference=ph.reference)
               for ph in args.phase_list if ph.key in rounds]
    targets = evaluate_targets({r.key: r for r in results})
    config = {
        "seconds": args.seconds, "rounds": args.rounds, "warmup": args.warmup, "idle_seconds": args.idle_seconds,
        "customers": args.customers, "cards": 2 * args.customers, "hot_keys": args.hot_keys,
        "shards": args.shards, "node_workers": 1, "near_cache_ttl": settings.near_cache_ttl,
        "client": args.client, "concurrency": args.concurrency, "threads": args.threads, "channels": args.channels,
        "batch_size": args.batch_size, "batch_concurrency": args.batch_concurrency, "batch_rate": args.batch_rate,
        "deadline": args.deadline, "streams": args.streams,
        "stream_window": args.stream_window, "pg_connections": args.pg_connections,
        "phases": ",".join(ph.key for ph in args.phase_list),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    print()
    print(console_table(results, targets))
    print(f"\nmachine: {machine['cpu_model']}, {machine['cores']} cores, {machine['python']}, "
          f"grpcio {machine['grpcio']}; pinning: {machine['pinning']}; run took {config['total_seconds']}s")
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latest.json").write_text(json.dumps(to_json(results, targets, machine, config), indent=2) + "\n")
        (args.out / "latest.md").write_text(markdown(results, targets, machine, config))
        print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    for f in failures:
        print(f"problem: {f}", file=sys.stderr)
    if failures:
        return 1
    if args.strict and any(t.status == "MISS" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
