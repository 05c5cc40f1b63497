"""`python -m loadtests.sweep`: the scaling sweep — throughput and CPU cost per lookup vs node processes.

Run with --help for the manual; docs/loadtests.md explains the method and how to read the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.processes import reap_killed
from loadtests.shared.keys import SCENARIOS, DataSet, format_mix, parse_mix
from loadtests.shared.latency import Timeline, coefficient_of_variation
from loadtests.shared.machine import (
    cores_first,
    cpu_model,
    describe_topology,
    git_commit,
    kernel,
    sibling_sets,
    utc_now,
)
from loadtests.shared.metrics import scrape_tiers
from loadtests.shared.paths import LOCUSTFILE, REPO, SWEEP_DIR
from loadtests.shared.procs import cpu_delta, pin, runtime_snapshot
from loadtests.sweep.report import RunResult, by_series, markdown, plot, scaling, to_csv, to_json, verdict

DEFAULT_OUT = SWEEP_DIR

DESCRIPTION = """\
For each node count (and Redis shard count), start the service with that many node processes
(`crs serve --workers N` on the embedded stack: PostgreSQL + Redis shards + demo data), drive it with
locust workers (master + one worker per load core), and measure in a window after spawning and
warm-up: lookups/s, p50/p95/p99 per call, error rate, and CPU-seconds per 1,000 lookups of the
node processes, of Redis and of PostgreSQL (scheduler run time from /proc, every thread). An idle
window before each load gives every tier's fixed cost. Then write a report: sweep.csv, sweep.json,
throughput.png (CPU per lookup vs size with the +-10% band, lookups/s vs the ideal; matplotlib) and
README.md with PASS/FAIL per size: node, Redis and PostgreSQL CPU per lookup each within +-10% of the
smallest size's (linear cost per transaction).

Two series: --nodes (node processes grow; --shards fixed or one per size) and --shard-series (Redis
shards grow at --shard-series-nodes nodes). Paced (--per-node-rate) every size sees the same load per
node and the same users (connections) per node: that is how a machine too small to saturate the
biggest size still compares sizes like with like.

Before the scaling runs, each scenario in --calibrate runs alone on the smallest configuration and a
light-load run measures service latency: `crs-load capacity` reads those per-scenario costs.

CPU layout. With enough cores (nodes + Redis/PostgreSQL cores + at least one load core) every role
gets its own cores: nodes on the first N, Redis and PostgreSQL on the next, one locust worker per
remaining core ("dedicated"). With fewer cores the service side shares the first half of the cores
and the load generator the rest ("shared"): wall throughput then cannot grow with nodes, and the
per-lookup CPU cost is what shows whether scaling is linear (constant within +-10%).
"""

EPILOG = """\
Examples:
  python -m loadtests.sweep --nodes 1,2 --seconds 8                      # a 2-core machine, ~4 min
  python -m loadtests.sweep --nodes 1,2,4,8 --shards 1,1,2,2 --customers 100000 \\
      --machine-name "16-core c7i.4xlarge"                                  # a 16-core machine
  python -m loadtests.sweep --nodes 1,2 --calibrate none --no-light --out /tmp/sweep
  python -m loadtests.sweep --nodes 1,2,4,8 --shards 2 --shard-series 1,2,4,8,16 --shard-series-nodes 4 \\
      --node-mode processes --per-node-rate 100 --seconds 20      # paced, past a 2-core machine's size

Linux only (/proc, sched_setaffinity). Every server listens on 127.0.0.1; every run stops by itself
(locust --run-time bounds it even if this process dies). Exit status: 0 done, 1 a run failed or
answered unexpected statuses, 2 bad usage, 3 the environment did not start.
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, not {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.sweep", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to sweep")
    g.add_argument("--nodes", type=_int_list, default=None,
                   help="node process counts, e.g. 1,2,4,8 (default: 1,2,4,8 with >= 16 cores, else 1,2)")
    g.add_argument("--shards", type=_int_list, default=[2],
                   help="Redis shards: one count for every size, or one per --nodes entry (default 2)")
    g.add_argument("--node-mode", choices=("workers", "processes"), default="workers",
                   help="N nodes = one `crs serve --workers N` (workers; default, how a pod runs) or N separate "
                        "`crs serve --workers 1` on one port (processes; like N single-core pods)")
    g.add_argument("--shard-series", type=_int_list, default=[],
                   help="a second series: these Redis shard counts, e.g. 1,2,4,8,16, each at "
                        "--shard-series-nodes nodes (default: none)")
    g.add_argument("--shard-series-nodes", type=int, default=4,
                   help="node processes of every --shard-series run (default 4)")
    g.add_argument("--mix", default="retail",
                   help=f"scenario mix of the scaling runs, as locust's --crs-mix (default retail; "
                        f"scenarios: {', '.join(SCENARIOS)})")
    g.add_argument("--calibrate", default=",".join(SCENARIOS),
                   help="scenarios run alone on the smallest configuration for the capacity model "
                        "('none' to skip; default all)")
    g.add_argument("--no-light", action="store_true", help="skip the light-load latency run")
    g.add_argument("--customers", type=int, default=10_000,
                   help="demo customers: x2 cards, x1.5 accounts; warming resolves all of their ~6.5 keys each "
                        "(default 10000)")
    g.add_argument("--skew", type=float, default=0.99, help="Zipf exponent of key popularity (default 0.99)")
    g.add_argument("--unknown", type=float, default=0.02, help="share of unknown keys (default 0.02)")
    g.add_argument("--malformed", type=float, default=0.01, help="share of malformed keys (default 0.01)")
    g = p.add_argument_group("load and timing")
    g.add_argument("--seconds", type=float, default=10.0, help="measured window per run (default 10)")
    g.add_argument("--warmup", type=float, default=4.0, help="seconds after all users spawned, not measured "
                                                             "(default 4)")
    g.add_argument("--per-node-rate", type=float, default=0.0,
                   help="offer this many calls/s per node (n nodes get n x this, from --users-per-node x n users "
                        "each paced at a random phase) instead of a closed loop as fast as the users can go; the "
                        "way to compare sizes on a machine whose load generator cannot saturate the biggest one "
                        "(default 0 = closed loop)")
    g.add_argument("--users-per-node", type=int, default=None,
                   help="simulated users (connections) per node, so every size sees the same connections per "
                        "node: n nodes get n x this, spread over the locust workers (paced runs: default 16; "
                        "closed loop: default unset = --users-per-worker x workers, the same total at every "
                        "size; set it when the smallest size would otherwise queue past its deadlines)")
    g.add_argument("--idle-seconds", type=float, default=5.0,
                   help="an idle window before each load (fresh nodes, serving, no traffic) that measures each "
                        "tier's fixed CPU cost (default 5; 0 = skip)")
    g.add_argument("--rounds", type=int, default=1,
                   help="run every sweep size this many times, interleaved (odd rounds smallest first, even rounds "
                        "largest first), and pool the rounds per size: on a machine shared with other work one run "
                        "per size can move +-15%% with the background load (default 1)")
    g.add_argument("--locust-workers", type=int, default=0,
                   help="locust worker processes (default 0 = one per load core)")
    g.add_argument("--users-per-worker", type=int, default=32,
                   help="simulated users per locust worker, each with its own connection (default 32)")
    g.add_argument("--light-users", type=int, default=2, help="users of the light-load run (default 2)")
    g.add_argument("--light-rate", type=float, default=50.0,
                   help="calls/s per user in the light-load run (default 50)")
    g.add_argument("--cold", action="store_true",
                   help="flush Redis before each run instead of resolving every demo key once at the start "
                        "(default: warm, the steady state of a service whose hot set fits in Redis)")
    g.add_argument("--cache-ttl", type=float, default=3600.0,
                   help="CRS_CACHE_TTL of the sweep's nodes, long enough that the warmed Redis stays warm for "
                        "the whole sweep (default 3600)")
    g.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    g.add_argument("--pg-binaries", default="auto", choices=("auto", "system", "pgserver"))
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="report directory (default docs/benchmarks/sweep)")
    g.add_argument("--machine-name", default="",
                   help="how the report names this machine (default: hostname, cores and CPU model)")
    g.add_argument("--artifacts", type=Path, default=None,
                   help="keep each run's locust CSV/HTML/logs here (default: a temporary directory, removed)")
    g.add_argument("--rerender", action="store_true",
                   help="run nothing: rewrite README.md, sweep.csv and throughput.png in --out from its sweep.json")
    g.add_argument("--note", action="append", default=[],
                   help="a paragraph for the report (what the numbers mean on this machine); repeatable, kept "
                        "by --rerender, or replaced by the --note paragraphs given with it")
    g.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.nodes is None:
        args.nodes = [1, 2, 4, 8] if cores >= 16 else [1, 2]
    if len(args.shards) == 1:
        args.shards = args.shards * len(args.nodes)
    if len(args.shards) != len(args.nodes):
        p.error(f"--shards: give one count or {len(args.nodes)} (one per --nodes entry), not {len(args.shards)}")
    try:
        parse_mix(args.mix)
        args.calibrate_list = [] if args.calibrate.strip() == "none" else list(parse_mix(args.calibrate))
    except ValueError as exc:
        p.error(str(exc))
    if args.seconds <= 0 or args.warmup < 0:
        p.error("--seconds must be > 0 and --warmup >= 0")
    if args.idle_seconds < 0:
        p.error("--idle-seconds must be >= 0")
    closed_per_node = args.users_per_node is not None and args.per_node_rate <= 0
    args.closed_users_per_node = args.users_per_node if closed_per_node else 0
    if args.users_per_node is None:
        args.users_per_node = 16
    for name in ("customers", "users_per_worker", "light_users", "users_per_node", "shard_series_nodes", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.locust_workers < 0:
        p.error("--locust-workers must be >= 0")
    return args


def calibration_users(scenario: str, users_per_worker: int) -> int:
    """Fewer users for the many-key scenarios: a BatchResolve of up to 500 keys or a stream with 16
    keys outstanding is already dozens of lookups in flight per user; 32 such users queue for
    seconds and time out instead of measuring cost."""
    divisor = {"batch": 8, "stream": 4}.get(scenario, 1)
    return max(2, users_per_worker // divisor)


# -- CPU layout (pure) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    mode: str                       # dedicated, shared, off
    nodes: tuple[int, ...]          # cores of the node processes (empty = unpinned)
    backends: tuple[int, ...]       # Redis + PostgreSQL
    locust: tuple[int, ...]         # one locust worker per core
    workers: int                    # locust worker processes

    def describe(self) -> str:
        if self.mode == "off":
            return f"not pinned; {self.workers} locust worker(s)"

        def span(cpus: tuple[int, ...]) -> str:
            return ",".join(str(c) for c in cpus)

        if self.mode == "shared":
            return (f"shared: nodes + Redis + PostgreSQL on CPU {span(self.nodes)}, {self.workers} locust worker(s) "
                    f"on CPU {span(self.locust)}")
        return (f"dedicated: nodes on CPU {span(self.nodes)}, Redis + PostgreSQL on CPU {span(self.backends)}, "
                f"{self.workers} locust worker(s) on CPU {span(self.locust)}")


def backend_cores(shards: int) -> int:
    """Cores for Redis + PostgreSQL: one per two shards (Redis is single-threaded and, behind a
    near-cache, far less busy than a node), at least one."""
    return max(1, math.ceil(shards / 2))


def plan_layout(cpus: Sequence[int], nodes: int, shards: int, locust_workers: int = 0, pin: bool = True) -> Layout:
    """Hands out `cpus` in the order given (machine.cores_first: whole physical cores first)."""
    cpus = tuple(cpus)
    if not pin or len(cpus) < 2:
        return Layout("off", (), (), (), locust_workers or 1)
    need = nodes + backend_cores(shards)
    if len(cpus) >= need + 1:
        load = cpus[need:]
        workers = min(locust_workers, len(load)) if locust_workers else len(load)
        return Layout("dedicated", cpus[:nodes], cpus[nodes:need], load, workers)
    half = max(1, len(cpus) // 2)
    load = cpus[half:]
    workers = locust_workers or len(load)
    return Layout("shared", cpus[:half], cpus[:half], load, workers)


# Processes: CPU time and pinning come from loadtests/shared/procs.py (psutil), the tier counters from
# loadtests/shared/metrics.py. Never import locust here: it patches gevent in.


# -- one locust run ---------------------------------------------------------------------------------------
@dataclass
class LoadSpec:
    label: str
    mix: str
    users_per_worker: int
    workers: int
    user_rate: float = 0.0
    series: str = "nodes"
    round: int = 1


def paced_spec(series: str, mix: str, *, nodes: int, per_node_rate: float, users_per_node: int,
               workers: int) -> LoadSpec:
    """Same load and same users (connections) per node at every size: users_per_node x nodes users,
    spread evenly over the locust workers, each offering per_node_rate x nodes / users calls/s (0: a
    closed loop, each user as fast as its answers come)."""
    workers = max(1, min(workers, users_per_node * nodes))   # no locust worker without a user
    users_per_worker = math.ceil(users_per_node * nodes / workers)
    rate = per_node_rate * nodes / (users_per_worker * workers)
    return LoadSpec("sweep", mix, users_per_worker, workers, user_rate=rate, series=series)


class LocustRun:
    """locust master + workers, pinned, recording timelines; stopped with SIGTERM after the window."""

    def __init__(self, spec: LoadSpec, *, host: str, customers: int, args: argparse.Namespace, layout: Layout,
                 workdir: Path, max_seconds: float) -> None:
        from devstack import free_port

        self.spec, self.workdir = spec, workdir
        self.record = workdir / "timelines"
        self.record.mkdir(parents=True, exist_ok=True)
        self.spawned = threading.Event()
        self.failed_start = ""
        self.procs: list[subprocess.Popen[bytes]] = []
        port = free_port()
        users = spec.users_per_worker * spec.workers
        common = ["-f", str(LOCUSTFILE), "--crs-mix", spec.mix, "--crs-customers", str(customers),
                  "--crs-skew", str(args.skew), "--crs-unknown", str(args.unknown), "--crs-malformed",
                  str(args.malformed), "--crs-record", str(self.record), "--crs-user-rate", str(spec.user_rate)]
        master = [sys.executable, "-m", "locust", *common, "--master", "--headless", "--master-bind-host",
                  "127.0.0.1", "--master-bind-port", str(port), "--expect-workers", str(spec.workers),
                  "-u", str(users), "-r", str(users), "-t", f"{math.ceil(max_seconds)}s", "--host", host,
                  "--csv", str(workdir / "locust"), "--html", str(workdir / "locust.html"), "--only-summary",
                  "--loglevel", "INFO", "--stop-timeout", "5"]
        load_cpus = layout.locust
        self.master_log = (workdir / "master.log").open("wb")
        self.procs.append(self._spawn(master, set(load_cpus), stderr=subprocess.PIPE))
        for i in range(spec.workers):
            worker = [sys.executable, "-m", "locust", *common, "--worker", "--master-host", "127.0.0.1",
                      "--master-port", str(port), "--loglevel", "WARNING"]
            cpus = {load_cpus[i % len(load_cpus)]} if load_cpus else set()
            log = (workdir / f"worker-{i}.log").open("wb")
            self.procs.append(self._spawn(worker, cpus, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        threading.Thread(target=self._watch_master, daemon=True).start()

    def _spawn(self, argv: list[str], cpus: set[int], **kwargs: Any) -> subprocess.Popen[bytes]:
        # Pinned right after the start, not in a preexec_fn: that makes subprocess fork instead of
        # vfork, which gRPC (loaded in this process) does not survive (docs/decisions.md, grpc#43055).
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        if cpus:
            try:
                os.sched_setaffinity(proc.pid, cpus)   # before the interpreter starts its threads
            except OSError:
                pass
        return proc

    def _watch_master(self) -> None:
        stream = self.procs[0].stderr
        assert stream is not None
        for raw in iter(stream.readline, b""):
            self.master_log.write(raw)
            self.master_log.flush()
            # A master whose worker reports late (a busy machine) logs "Spawning is complete and report
            # waittime is expired ..." instead of "All users spawned"; the users run either way.
            if b"All users spawned" in raw or b"Spawning is complete" in raw:
                self.spawned.set()
        self.failed_start = self.failed_start or "locust master exited"
        self.spawned.set()

    def wait_spawned(self, timeout: float) -> float:
        if not self.spawned.wait(timeout) or self.procs[0].poll() is not None:
            raise RuntimeError(f"locust did not spawn its users within {timeout:.0f}s (see {self.workdir})")
        return time.time()

    def stop(self) -> None:
        master = self.procs[0]
        if master.poll() is None:
            master.send_signal(signal.SIGTERM)   # headless master: stop, tell workers to quit, write reports
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                reap_killed(proc)
        self.master_log.close()

    def timeline(self) -> Timeline:
        out = Timeline()
        for path in sorted(self.record.glob("timeline-*.json")):
            out.merge(Timeline.from_json(json.loads(path.read_text())))
        return out


# -- the stack --------------------------------------------------------------------------------------------
def _clients(servers: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    """(url, a redis-py client) for each Redis server, the client closed after its turn."""
    import redis

    for r in servers:
        client = redis.Redis.from_url(r.url)
        try:
            yield r.url, client
        finally:
            client.close()


class Stack:
    """One DevEnvironment (PostgreSQL + the most shards any configuration needs); nodes per configuration."""

    def __init__(self, args: argparse.Namespace, shards: int) -> None:
        from devstack.environment import DevEnvironment

        self.env = DevEnvironment(shards=shards, customers=args.customers, pg_binaries=args.pg_binaries)
        self.nodes: list[Any] = []
        self.cache_ttl = float(args.cache_ttl)

    def start(self, quiet: Any) -> None:
        self.env.start(out=quiet)
        self.empty_memory = {r.url: self._used_memory(r.url) for r in self.redis}

    @staticmethod
    def _used_memory(url: str) -> int:
        import redis

        client = redis.Redis.from_url(url)
        try:
            return int(client.info("memory")["used_memory"])
        finally:
            client.close()

    def warm(self, customers: int, seed: int = 1, batch: int = 25) -> float:
        """Resolve every key of the demo data set once (BatchResolve), so Redis holds them all: the runs
        then measure a warm service (steady state) rather than its first minutes. Returns seconds."""
        import grpc

        from devstack.demo import demo_account_number, demo_customer_id, demo_pan, demo_routing, demo_token
        from loadtests.shared.keys import DataSet
        from server import rpc
        from server.proto import crs_pb2 as pb

        data = DataSet(customers, seed)
        keys: list[pb.LookupKey] = []
        keys += [pb.LookupKey(pan=demo_pan(i)) for i in range(data.cards)]
        keys += [pb.LookupKey(card_token=demo_token(seed, i)) for i in range(data.cards)]
        keys += [pb.LookupKey(account=pb.AccountKey(routing_number=demo_routing(i),
                                                    account_number=demo_account_number(i)))
                 for i in range(data.accounts)]
        keys += [pb.LookupKey(customer_id=demo_customer_id(i)) for i in range(data.customers)]
        started = time.monotonic()
        retry: list[pb.LookupKey] = []
        with grpc.insecure_channel(self.address) as channel:
            stub = rpc.stub(channel, "LookupService")

            def call(chunk: list[pb.LookupKey]) -> list[pb.LookupKey]:
                """Resolve a chunk; the keys that did not answer OK (a miss that timed out under load)."""
                try:
                    reply = stub.BatchResolve(pb.BatchResolveRequest(keys=chunk), timeout=120)
                except grpc.RpcError:
                    return chunk
                return [k for k, r in zip(chunk, reply.results, strict=True) if r.code != 0]

            # One small batch at a time. Each key of a batch that misses Redis runs its own GET (and SET)
            # at once; more of them than CRS_REDIS_POOL_SIZE (32) wait for a connection, and a wait
            # longer than CRS_REDIS_TIMEOUT (0.25 s) on a busy core is a shard error: three in a row and
            # the node marks the shard down, then flushes it when it comes back (docs/loadtests.md).
            for i in range(0, len(keys), batch):
                retry += call(keys[i:i + batch])
            for i in range(0, len(retry), 50):   # a second, gentle pass
                left = call(retry[i:i + 50])
                if left:
                    print(f"sweep: warning: {len(left)} demo key(s) did not resolve while warming",
                          file=sys.stderr)
        return time.monotonic() - started

    @property
    def redis(self) -> list[Any]:
        assert self.env.stack is not None
        return list(self.env.stack.redis)

    def start_node(self, nodes: int, shards: int, mode: str = "workers") -> None:
        """`workers`: one `crs serve --workers N` (how a pod runs it; with N = 1 there is no supervisor
        process and metrics stay in-process, with N >= 2 prometheus_client runs in multiprocess mode).
        `processes`: N separate `crs serve --workers 1` sharing one port (SO_REUSEPORT), like N
        single-core pods: every size runs the same code path."""
        from devstack import free_port
        from devstack.environment import start_node

        self.stop_node()
        assert self.env.stack is not None
        used = self.env.settings().redis_shards[:shards]
        log_dir = Path(self.env.stack.base_dir) / "logs"
        log_dir.mkdir(exist_ok=True)
        port = free_port()
        count, workers = (nodes, 1) if mode == "processes" else (1, nodes)
        for i in range(count):
            # share_port: the processes mode's nodes serve one port together on purpose (crs serve refuses
            # a port already served otherwise).
            settings = dataclasses.replace(self.env.settings(grpc_port=port, workers=workers, metrics_port=free_port(),
                                                             cache_ttl=self.cache_ttl, share_port=count > 1),
                                           redis_shards=used)
            node = start_node(settings, log_path=log_dir / f"node-{port}-{i}.log")
            self.nodes.append(node)
            self.env.nodes.append(node)

    @property
    def address(self) -> str:
        return str(self.nodes[0].address)

    @property
    def node_pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes]

    @property
    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{n.settings.metrics_port}/metrics" for n in self.nodes]

    def stop_node(self) -> None:
        for node in self.nodes:
            node.stop()
            self.env.nodes.remove(node)
        self.nodes = []

    def used_redis(self, shards: int) -> list[Any]:
        urls = [s.url for s in self.env.settings().redis_shards[:shards]]
        return [r for r in self.redis if r.url in urls] or self.redis[:shards]

    def flush_redis(self) -> None:
        for _, client in _clients(self.redis):
            client.flushall()

    def redis_memory(self, shards: int) -> tuple[int, int]:
        """(keys, bytes of used_memory above the empty server's) summed over the shards in use."""
        keys = used = 0
        for url, client in _clients(self.used_redis(shards)):
            keys += int(client.dbsize())
            used += int(client.info("memory")["used_memory"]) - self.empty_memory.get(url, 0)
        return keys, max(0, used)

    def redis_counters(self, shards: int) -> tuple[int, int]:
        """(commands, read events) Redis counted so far (INFO stats), summed over the shards in use."""
        commands = reads = 0
        for _, client in _clients(self.used_redis(shards)):
            stats = client.info("stats")
            commands += int(stats.get("total_commands_processed", 0))
            reads += int(stats.get("total_reads_processed", 0))
        return commands, reads

    def stop(self) -> None:
        self.env.stop()


# -- one measured run ---------------------------------------------------------------------------------------
# A node process that answers SERVING is still busy for several seconds (pools filling, first topology and
# BIN loads, lazy imports): measured 0.9 CPU-s/s for 8 fresh processes on the 2-core VM. Before the idle
# window (and the load), wait until the nodes use at most this much CPU per process, one second at a time.
SETTLED_CORES_PER_NODE = 0.02
SETTLE_TIMEOUT_SECONDS = 60.0


def settle(node_pids: list[int], nodes: int, log: Callable[[str], None]) -> float:
    """Wait until the node processes are quiet (see SETTLED_CORES_PER_NODE); returns the seconds waited."""
    started = time.monotonic()
    before = runtime_snapshot(node_pids)
    while time.monotonic() - started < SETTLE_TIMEOUT_SECONDS:
        time.sleep(1.0)
        after = runtime_snapshot(node_pids)
        if cpu_delta(before, after) <= SETTLED_CORES_PER_NODE * nodes:
            return time.monotonic() - started
        before = after
    log(f"  warning: the nodes did not settle within {SETTLE_TIMEOUT_SECONDS:.0f}s; the idle figure includes "
        "their start-up")
    return time.monotonic() - started


def measure(stack: Stack, spec: LoadSpec, *, nodes: int, shards: int, layout: Layout, args: argparse.Namespace,
            workdir: Path, log: Callable[[str], None]) -> RunResult:
    assert stack.nodes and stack.env.stack is not None
    node_pids = stack.node_pids
    redis_pids = [r.pid for r in stack.used_redis(shards) if r.pid]
    pg_pids = [stack.env.stack.postgres.pid] if stack.env.stack.postgres.pid else []
    metrics_urls = stack.metrics_urls

    def pin_service() -> None:
        if layout.mode != "off":
            pin(node_pids, layout.nodes)
            pin(redis_pids + pg_pids, layout.backends)

    pin_service()
    idle_s, idle = 0.0, (0.0, 0.0, 0.0)
    settled = settle(node_pids, nodes, log)
    if args.verbose:
        log(f"  nodes settled in {settled:.0f}s")
    if args.idle_seconds > 0:
        pin_service()
        i0 = runtime_snapshot(node_pids), runtime_snapshot(redis_pids), runtime_snapshot(pg_pids)
        started = time.monotonic()
        time.sleep(args.idle_seconds)
        i1 = runtime_snapshot(node_pids), runtime_snapshot(redis_pids), runtime_snapshot(pg_pids)
        idle_s = time.monotonic() - started
        idle = (cpu_delta(i0[0], i1[0]), cpu_delta(i0[1], i1[1]), cpu_delta(i0[2], i1[2]))
    max_seconds = 90 + args.warmup + args.seconds
    run = LocustRun(spec, host=stack.address, customers=args.customers, args=args, layout=layout, workdir=workdir,
                    max_seconds=max_seconds)
    try:
        spawned_at = run.wait_spawned(60)
        t0 = math.ceil(spawned_at + args.warmup)
        t1 = t0 + math.ceil(args.seconds)
        time.sleep(max(0.0, t0 - time.time()))
        pin_service()   # PostgreSQL backends forked during the warm-up
        c0 = stack.redis_counters(shards)
        n0, r0, p0 = runtime_snapshot(node_pids), runtime_snapshot(redis_pids), runtime_snapshot(pg_pids)
        w0 = time.time()   # the CPU window's start; the /metrics scrape after it took up to 6 s on a crowded machine
        tiers0 = scrape_tiers(metrics_urls)
        time.sleep(max(0.0, t1 - time.time()))
        w1 = time.time()
        n1, r1, p1 = runtime_snapshot(node_pids), runtime_snapshot(redis_pids), runtime_snapshot(pg_pids)
        c1 = stack.redis_counters(shards)
        tiers1 = scrape_tiers(metrics_urls)
    finally:
        run.stop()
    keys, used_mem = stack.redis_memory(shards)
    timeline = run.timeline()
    window = timeline.window(t0, t1)
    if abs((w1 - w0) - (t1 - t0)) > 0.5:
        log(f"  warning: the CPU window was {w1 - w0:.2f}s for a {t1 - t0}s load window (the CPU snapshots were late)")
    return RunResult(
        label=spec.label, mix=spec.mix, nodes=nodes, shards=shards, node_cpus=len(layout.nodes),
        locust_workers=spec.workers, users=spec.users_per_worker * spec.workers, wall_s=float(t1 - t0),
        offered_calls_per_s=spec.user_rate * spec.users_per_worker * spec.workers,
        lookups=window.lookups, calls=window.calls, failures=window.failures, expected_errors=window.expected_errors,
        latency_ms=window.latency().summary(), node_cpu_s=cpu_delta(n0, n1), redis_cpu_s=cpu_delta(r0, r1),
        pg_cpu_s=cpu_delta(p0, p1),
        tiers={k: int(v - tiers0.get(k, 0.0)) for k, v in tiers1.items() if v - tiers0.get(k, 0.0) > 0},
        per_second=timeline.per_second(t0, t1), redis_keys=keys, redis_bytes=used_mem,
        redis_commands=c1[0] - c0[0], redis_reads=c1[1] - c0[1],
        failure_kinds=dict(window.failure_kinds), series=spec.series, round=spec.round, started_at=float(t0),
        idle_s=idle_s,
        node_idle_cpu_s=idle[0],
        redis_idle_cpu_s=idle[1], pg_idle_cpu_s=idle[2])


def machine_info(name: str, layouts: dict[str, str]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "name": name or f"{socket.gethostname()} ({cores} cores)",
        "date": utc_now(), "cpu_model": cpu_model(), "cores": cores, "kernel": kernel(),
        "topology": describe_topology(sibling_sets(os.sched_getaffinity(0))),
        "python": platform.python_version(), "grpcio": pkg("grpcio"), "locust": pkg("locust"),
    }
    for key, text in layouts.items():
        info[f"layout ({key})"] = text
    info["load average at the end (1/5/15 min)"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["commit"] = git_commit()
    return info


def _summary_line(r: RunResult) -> str:
    lat = r.latency_ms
    return (f"{r.throughput:,.0f} lookups/s ({r.calls_per_s:,.0f} calls/s), p50 {lat.get('p50', math.nan):.2f} "
            f"p99 {lat.get('p99', math.nan):.2f} ms, node {r.node_cpu_per_1k:.3f} CPU-s/1k, "
            f"node cores busy {r.node_cores_busy:.2f}, errors {r.failures}")


def write_report(out: Path, results: Sequence[RunResult], machine: dict[str, Any], config: dict[str, Any],
                 notes: Sequence[str] = ()) -> str:
    out.mkdir(parents=True, exist_ok=True)
    report = to_json(results, machine, config)
    report["notes"] = list(notes)
    (out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "sweep.csv").write_text(to_csv(results))
    has_plot = plot(results, str(out / "throughput.png"))
    (out / "README.md").write_text(markdown(results, machine, config, "throughput.png" if has_plot else None,
                                            notes))
    return f"wrote {out}/README.md, sweep.json, sweep.csv" + (", throughput.png" if has_plot else
                                                              " (no plot: pip install matplotlib)")


def rerender(out: Path, notes: list[str]) -> int:
    """Rewrite the report from its sweep.json; `notes`, when given, replace the notes it holds."""
    from loadtests.sweep.report import runs_from_report

    report = json.loads((out / "sweep.json").read_text())
    print(write_report(out, runs_from_report(report), report["machine"], report["config"],
                       notes or report.get("notes", [])))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rerender:
        return rerender(args.out, args.note)
    if not Path("/proc/self/stat").exists():
        print("sweep: needs Linux (/proc)", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    from server.logs import configure_logging

    configure_logging("WARNING")
    topology = sibling_sets(os.sched_getaffinity(0))
    cpus = cores_first(topology)
    node_configs = list(zip(args.nodes, args.shards, strict=True))
    sweeps = ([("nodes", n, s) for n, s in node_configs]
              + [("shards", args.shard_series_nodes, s) for s in args.shard_series])
    configs = [(n, s) for _, n, s in sweeps]
    layouts = {f"{n} nodes, {s} shards": plan_layout(cpus, n, s, args.locust_workers, not args.no_pin)
               for n, s in configs}
    started = time.monotonic()
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="crs-sweep-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    quiet = sys.stderr if args.verbose else open(os.devnull, "w")
    stack = Stack(args, max(s for _, s in configs))
    results: list[RunResult] = []
    problems: list[str] = []
    plan: list[tuple[int, int, LoadSpec]] = []
    interrupted = False

    def log(text: str) -> None:
        print(text, flush=True)

    try:
        log(f"sweep: starting PostgreSQL + {max(s for _, s in configs)} Redis shard(s), loading "
            f"{args.customers:,} demo customers ...")
        try:
            stack.start(quiet)
        except Exception as exc:
            print(f"sweep: the environment did not start: {exc}", file=sys.stderr)
            return 3
        n_first, s_first = min(node_configs)
        first_layout = layouts[f"{n_first} nodes, {s_first} shards"]
        for scenario in args.calibrate_list:
            plan.append((n_first, s_first, LoadSpec(f"calibrate:{scenario}", scenario,
                                                    calibration_users(scenario, args.users_per_worker),
                                                    first_layout.workers)))
        if not args.no_light:
            plan.append((n_first, s_first, LoadSpec("light", format_mix(parse_mix(args.mix)), args.light_users, 1,
                                                    user_rate=args.light_rate)))
        mix = format_mix(parse_mix(args.mix))
        for round_no in range(1, args.rounds + 1):
            for series, n, s in (sweeps if round_no % 2 else reversed(sweeps)):
                lay = layouts[f"{n} nodes, {s} shards"]
                if args.per_node_rate > 0:
                    spec = paced_spec(series, mix, nodes=n, per_node_rate=args.per_node_rate,
                                      users_per_node=args.users_per_node, workers=lay.workers)
                elif args.closed_users_per_node:
                    spec = paced_spec(series, mix, nodes=n, per_node_rate=0.0,
                                      users_per_node=args.closed_users_per_node, workers=lay.workers)
                else:
                    spec = LoadSpec("sweep", mix, args.users_per_worker, lay.workers, series=series)
                spec.round = round_no
                plan.append((n, s, spec))
        if args.per_node_rate <= 0 and any(lay.mode != "dedicated" for lay in layouts.values()):
            log("sweep: note: the load generator shares this machine's cores; a closed loop gives every size "
                "the same total load, so each node of a bigger size sees less traffic (and fewer near-cache "
                "hits). --per-node-rate compares sizes at the same load per node.")
        warmed_for: set[int] = set()   # the shard counts whose ring Redis was warmed for
        log(f"sweep: ready in {time.monotonic() - started:.0f}s; {len(plan)} runs of "
            f"~{args.warmup + args.seconds + 6:.0f}s; artifacts in {artifacts}")
        for i, (n, s, spec) in enumerate(plan, 1):
            lay = layouts[f"{n} nodes, {s} shards"]
            if args.cold:
                stack.flush_redis()
            stack.start_node(n, s, args.node_mode)   # fresh node processes (empty near-caches) every run
            if not args.cold and s not in warmed_for:
                # Once per shard count: the ring of s shards places most keys on other shards than the last
                # one did, and a run on half-empty shards would measure their filling. The copies stay (long
                # TTL, no writes), so a ring warmed once is warm whenever it comes back.
                log(f"sweep: warming Redis ({s} shard(s)): resolving all {DataSet(args.customers).keys:,} demo "
                    "keys once ...")
                log(f"    done in {stack.warm(args.customers):.0f}s")
                warmed_for.add(s)
            what = (f"{spec.label} ({spec.series} series, round {spec.round}/{args.rounds})" if spec.label == "sweep"
                    else spec.label)
            log(f"[{i}/{len(plan)}] {what}: {n} node(s), {s} shard(s), mix {spec.mix}, "
                f"{spec.users_per_worker * spec.workers} users on {spec.workers} locust worker(s) ...")
            try:
                res = measure(stack, spec, nodes=n, shards=s, layout=lay, args=args,
                              workdir=artifacts / f"{i:02d}-{spec.label.replace(':', '-')}-{n}n{s}s", log=log)
            except (RuntimeError, OSError) as exc:
                problems.append(f"{spec.label} at {n} nodes, {s} shards: {exc}")
                log(f"    FAILED: {exc}")
                continue
            results.append(res)
            cv = coefficient_of_variation(res.per_second)
            log(f"    {_summary_line(res)}; per-second CV {cv:.2f}")
            if res.failures:
                problems.append(f"{spec.label} at {n} nodes, {s} shards: {res.failures} unexpected status(es): "
                                f"{res.failure_kinds}")
            if res.lookups == 0:
                problems.append(f"{spec.label} at {n} nodes, {s} shards: no lookups in the window")
    except KeyboardInterrupt:
        # A report of the windows measured so far: a device call's time limit (SIGTERM from `timeout`)
        # used to leave nothing but the log of a five-minute run.
        print(f"\nsweep: interrupted; stopping everything (report of the {len(results)} window(s) measured)",
              file=sys.stderr)
        interrupted = True
        args.note = [*args.note, f"Interrupted after {len(results)} of {len(plan)} windows: the sizes and rounds "
                                 "that did not run are missing from this report."]
    finally:
        stack.stop()
        if quiet is not sys.stderr:
            quiet.close()
        if args.artifacts is None:      # a temporary directory: --help promises it goes
            shutil.rmtree(artifacts, ignore_errors=True)

    if interrupted and not results:
        return 130
    machine = machine_info(args.machine_name, {k: v.describe() for k, v in layouts.items()})
    machine["load average at the start (1/5/15 min)"] = load_at_start
    config = {"nodes": ",".join(map(str, args.nodes)), "node_mode": args.node_mode,
              "shards": ",".join(map(str, args.shards)),
              "shard_series": ",".join(map(str, args.shard_series)) or "none",
              "shard_series_nodes": args.shard_series_nodes if args.shard_series else "-",
              "mix": args.mix, "calibrate": ",".join(args.calibrate_list) or "none", "customers": args.customers,
              "cards": args.customers * 2, "skew": args.skew, "unknown": args.unknown, "malformed": args.malformed,
              "per_node_rate": args.per_node_rate or "closed loop",
              "caches": ("cold (Redis flushed before each run)" if args.cold
                         else f"warm (every demo key resolved once at the start; CRS_CACHE_TTL {args.cache_ttl:g}s)"),
              "seconds": args.seconds, "warmup": args.warmup,
              "users_per_worker": args.users_per_worker,
              "users_per_node": (args.users_per_node if args.per_node_rate > 0
                                 else args.closed_users_per_node or "-"),
              "rounds": args.rounds,
              "idle_seconds": args.idle_seconds,
              "light": "off" if args.no_light else f"{args.light_users} users x {args.light_rate:g} calls/s",
              "total_seconds": round(time.monotonic() - started, 1)}
    print()
    for series, group in by_series(results).items():
        rows = scaling(group)
        for row in rows:
            r = row.run
            print(f"{series}: {r.nodes} node(s) {r.shards} shard(s): {_summary_line(r)}; efficiency "
                  f"{row.efficiency:.2f}; CPU/lookup vs the smallest: node {row.cpu_ratio:.2f}x, Redis "
                  f"{row.redis_cpu_ratio:.2f}x, PostgreSQL {row.pg_cpu_ratio:.2f}x ({row.verdict})")
        print(f"verdict ({series}): {verdict(rows)}")
    print(write_report(args.out, results, machine, config, args.note))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 130 if interrupted else 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
