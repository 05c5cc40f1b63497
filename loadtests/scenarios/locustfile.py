"""Locust scenarios for CRS Lookup (docs/loadtests.md is the manual).

    locust -f loadtests/scenarios/locustfile.py --headless --crs-embedded 2000 -u 50 -r 25 -t 60s   # own stack
    locust -f loadtests/scenarios/locustfile.py --headless --host 127.0.0.1:50051 -u 200 -r 50 -t 5m \\
           --crs-customers 100000 --tags retail --csv out/crs --html out/crs.html      # a running node

Scenarios (each a tagged task; choose with --tags / --exclude-tags, or weigh with --crs-mix):
  retail    card authorisation: ResolveCard by PAN, or by token (--crs-token-share of them)
  ach       ResolveAccount by ABA routing + account number
  customer  customer service: GetCustomer
  batch     BatchResolve of --crs-batch-min..--crs-batch-max keys (cards, tokens and accounts)
  stream    StreamResolve: --crs-stream-keys keys per stream, --crs-stream-window outstanding
Key popularity is Zipf(--crs-skew) over the demo data set; --crs-unknown and --crs-malformed are the
shares of well-formed-but-absent and malformed keys. Their expected NOT_FOUND / INVALID_ARGUMENT
answers are successes reported under their own names, e.g. "ResolveCard pan [NOT_FOUND]"; only
unexpected statuses are failures (loadtests/scenarios/grpc_user.py says why).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:   # `locust -f loadtests/scenarios/locustfile.py` from any directory, installed or not
    sys.path.insert(0, str(REPO))

import gevent  # noqa: E402
import grpc  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402
from locust import constant, constant_throughput, events, tag, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from loadtests.scenarios.grpc_user import GrpcStatus, GrpcUser, TlsOptions, report_name  # noqa: E402
from loadtests.shared.keys import DEFAULT_MIX, KINDS, SCENARIOS, DataSet, Key, KeyMaker, integer_weights, parse_mix  # noqa: E402
from loadtests.shared.latency import Timeline  # noqa: E402
from server.proto import crs_pb2 as pb  # noqa: E402

MANY_KEY_KINDS = ("pan", "pan", "token", "account")   # what batches and streams carry: mostly cards


# -- command line ------------------------------------------------------------------------------------
@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    g = parser   # locust's parser (its include_in_web_ui works on the parser, not on argument groups)
    g.add_argument("--crs-mix", default=DEFAULT_MIX,
                   help=f"task weights by scenario, e.g. 'retail=80,ach=20' or just 'batch' "
                        f"(scenarios: {', '.join(SCENARIOS)}; default {DEFAULT_MIX}); --tags filters on top")
    g.add_argument("--crs-customers", type=int, default=100_000,
                   help="customers in the target's demo data set (crs-dev up / crs-dev load-demo; default 100000)")
    g.add_argument("--crs-seed", type=int, default=1, help="demo data seed of the target (default 1)")
    g.add_argument("--crs-skew", type=float, default=0.99,
                   help="Zipf exponent of key popularity: 0 uniform, ~1 real card traffic (default 0.99)")
    g.add_argument("--crs-unknown", type=float, default=0.02,
                   help="share of well-formed keys that do not exist -> NOT_FOUND (default 0.02)")
    g.add_argument("--crs-malformed", type=float, default=0.01,
                   help="share of malformed keys -> INVALID_ARGUMENT (default 0.01)")
    g.add_argument("--crs-token-share", type=float, default=0.3,
                   help="share of retail lookups by card token rather than PAN (default 0.3)")
    g.add_argument("--crs-batch-min", type=int, default=50, help="keys per BatchResolve, lowest (default 50)")
    g.add_argument("--crs-batch-max", type=int, default=500, help="keys per BatchResolve, highest (default 500)")
    g.add_argument("--crs-stream-keys", type=int, default=200, help="keys sent per StreamResolve (default 200)")
    g.add_argument("--crs-stream-window", type=int, default=16,
                   help="keys outstanding per stream (default 16)")
    g.add_argument("--crs-user-rate", type=float, default=0.0,
                   help="task runs per second per user, each user starting at a random phase (0 = back to back, "
                        "to saturate; default 0)")
    g.add_argument("--crs-timeout", type=float, default=5.0, help="seconds per call (default 5)")
    g.add_argument("--crs-embedded", type=int, default=0, metavar="CUSTOMERS",
                   help="start the embedded stack (PostgreSQL, Redis, one node) with this many demo "
                        "customers and aim at it; replaces --host (default 0 = off)")
    g.add_argument("--crs-embedded-workers", type=int, default=1, help="node processes of --crs-embedded")
    g.add_argument("--crs-embedded-shards", type=int, default=2, help="Redis shards of --crs-embedded")
    g.add_argument("--crs-embedded-tls", action="store_true",
                   help="the embedded stack serves mutual TLS (dev PKI, as `crs-dev up` does); the users connect with "
                        "its CA and 'admin' client certificate through the --crs-tls-* hook")
    g.add_argument("--crs-tls-ca", default="", help="TLS hook: CA bundle that signs the server certificate")
    g.add_argument("--crs-tls-cert", default="", help="TLS hook: client certificate (mutual TLS)")
    g.add_argument("--crs-tls-key", default="", include_in_web_ui=False, help="TLS hook: client private key")
    g.add_argument("--crs-tls-server-name", default="", help="TLS hook: name expected in the server certificate")
    g.add_argument("--crs-record", default="", include_in_web_ui=False,
                   help="directory: each load process writes timeline-HOST-PID.json there: per-second counts "
                        "and 1%%-resolution latency histograms per request name (the sweep and tests read it)")


def _opts(environment: Any) -> Any:
    return environment.parsed_options


def data_set(opts: Any) -> DataSet:
    return DataSet(customers=opts.crs_embedded or opts.crs_customers, seed=opts.crs_seed)


def tls_options(opts: Any) -> TlsOptions | None:
    if not (opts.crs_tls_ca or opts.crs_tls_cert or opts.crs_tls_key):
        return None
    path = lambda s: Path(s) if s else None  # noqa: E731
    return TlsOptions(ca=path(opts.crs_tls_ca), cert=path(opts.crs_tls_cert), key=path(opts.crs_tls_key),
                      server_name=opts.crs_tls_server_name or None)


# -- the user ------------------------------------------------------------------------------------------
class CrsUser(GrpcUser):
    """One simulated client: its own connection, its own random stream of keys."""

    wait_time = constant(0)

    def on_start(self) -> None:
        opts = _opts(self.environment)
        self.timeout = opts.crs_timeout
        self.rng = random.Random()
        self.keys = KeyMaker(data_set(opts), skew=opts.crs_skew, unknown=opts.crs_unknown,
                             malformed=opts.crs_malformed, rng=self.rng)
        self.token_share = opts.crs_token_share
        self.batch_range = (opts.crs_batch_min, opts.crs_batch_max)
        self.stream_keys, self.stream_window = opts.crs_stream_keys, opts.crs_stream_window
        if opts.crs_user_rate > 0:
            pacing = constant_throughput(opts.crs_user_rate)
            self.wait_time = lambda: pacing(self)  # type: ignore[method-assign]
            # A random phase: users spawned together would otherwise stay in step and send their calls
            # in bursts (all of them within a millisecond, once per period), which queue behind each
            # other and look cheaper per call to a node that gets more of them at once.
            gevent.sleep(self.rng.uniform(0, 1 / opts.crs_user_rate))

    def __init__(self, environment: Any) -> None:
        if environment.parsed_options is not None:
            type(self).tls = tls_options(environment.parsed_options)
        super().__init__(environment)

    # -- scenarios --------------------------------------------------------------------------------
    @tag("retail")
    @task(70)
    def retail(self) -> None:
        key = self.keys.card(self.token_share)
        request = pb.ResolveCardRequest(pan=key.pan) if key.kind == "pan" else pb.ResolveCardRequest(token=key.token)
        self.call("ResolveCard", request, name=f"ResolveCard {key.kind}", expect=key.expect)

    @tag("ach")
    @task(15)
    def ach(self) -> None:
        key = self.keys.key("account")
        self.call("ResolveAccount", pb.ResolveAccountRequest(routing_number=key.routing,
                                                             account_number=key.account_number),
                  name="ResolveAccount", expect=key.expect)

    @tag("customer")
    @task(10)
    def customer(self) -> None:
        key = self.keys.key("customer")
        self.call("GetCustomer", pb.GetCustomerRequest(customer_id=key.customer_id), name="GetCustomer",
                  expect=key.expect)

    @tag("batch")
    @task(3)
    def batch(self) -> None:
        n = self.rng.randint(*self.batch_range)
        keys = [self.keys.any_key(MANY_KEY_KINDS) for _ in range(n)]
        request = pb.BatchResolveRequest(keys=[lookup_key(k, str(i)) for i, k in enumerate(keys)])
        # Reported here, not by the interceptor: the call's lookups are the keys answered as expected,
        # which only the answer says (a key answered UNAVAILABLE is a failure, not a lookup).
        started = time.perf_counter()
        try:
            reply = self.raw_stub.BatchResolve(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            self._fire("grpc", "BatchResolve", (time.perf_counter() - started) * 1000, _status_of(exc))
            return
        ms = (time.perf_counter() - started) * 1000
        answered = sum(self._check_result(f"BatchResolve {key.kind}", key, result, 0.0, "grpc-batch-key")
                       for key, result in zip(keys, reply.results, strict=False))
        self._fire("grpc", "BatchResolve", ms, None, length=reply.ByteSize(), lookups=answered)
        if len(reply.results) != len(keys):
            self._fire("grpc-batch-key", "BatchResolve key", 0.0, GrpcStatus(
                "MISSING_RESULTS", f"{len(keys)} keys sent, {len(reply.results)} results"))

    @tag("stream")
    @task(2)
    def stream(self) -> None:
        keys = [self.keys.any_key(MANY_KEY_KINDS) for _ in range(self.stream_keys)]
        window = Semaphore(self.stream_window)
        sent: dict[str, float] = {}
        ended = False

        def requests() -> Any:   # read by grpc on a thread (greenlet) of its own
            for i, key in enumerate(keys):
                window.acquire()
                if ended:        # the call is over: no answer will free another slot
                    return
                sent[str(i)] = time.perf_counter()
                yield lookup_key(key, str(i))

        started = time.perf_counter()
        received = 0
        try:
            responses = self.raw_stub.StreamResolve(requests(), timeout=self.timeout + len(keys) * 0.05)
            for result in responses:
                window.release()
                t_sent = sent.pop(result.correlation_id, None)
                if t_sent is None:
                    self._fire("grpc-stream", "StreamResolve key", 0.0, GrpcStatus(
                        "UNKNOWN_CORRELATION_ID", repr(result.correlation_id[:40])))
                    continue
                received += 1
                key = keys[int(result.correlation_id)]
                self._check_result(f"StreamResolve {key.kind}", key, result,
                                   (time.perf_counter() - t_sent) * 1000, "grpc-stream")
        except Exception as exc:   # grpc.RpcError, or anything the stream raised
            self._fire("grpc-stream", "StreamResolve", (time.perf_counter() - started) * 1000, _status_of(exc))
            return
        finally:
            ended = True
            window.release()     # wakes a request reader still waiting for a slot, which then stops
        if received != len(keys):
            self._fire("grpc-stream", "StreamResolve", (time.perf_counter() - started) * 1000,
                       GrpcStatus("MISSING_RESULTS", f"{len(keys)} keys sent, {received} results"))

    # -- reporting of per-key results (batch and stream) -------------------------------------------
    def _check_result(self, name: str, key: Key, result: pb.LookupResult, ms: float, request_type: str) -> bool:
        """Whether the key was answered as expected; a key that was not is reported as a failure."""
        code = _code_name(result.code)
        if code == key.expect:
            if request_type == "grpc-stream":   # batch keys that answered as expected are in the call's row
                self._fire(request_type, report_name(name, key.expect), ms, None, length=result.ByteSize())
            return True
        self._fire(request_type, report_name(name, key.expect), ms, GrpcStatus(code, result.message, key.expect))
        return False

    def _fire(self, request_type: str, name: str, ms: float, exc: Exception | None, length: int = 0,
              lookups: int = 1) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=ms,
                                             response_length=length, response=None,
                                             context={"lookups": lookups if exc is None else 0}, exception=exc)


def _status_of(exc: Exception) -> GrpcStatus:
    """A failed call's status (a grpc.RpcError's code and details, else the exception's type)."""
    code = exc.code().name if hasattr(exc, "code") and callable(exc.code) else type(exc).__name__
    details = exc.details() if hasattr(exc, "details") and callable(exc.details) else str(exc)
    return GrpcStatus(code, details or "")


def lookup_key(key: Key, correlation_id: str) -> pb.LookupKey:
    if key.kind == "pan":
        return pb.LookupKey(pan=key.pan, correlation_id=correlation_id)
    if key.kind == "token":
        return pb.LookupKey(card_token=key.token, correlation_id=correlation_id)
    if key.kind == "account":
        return pb.LookupKey(account=pb.AccountKey(routing_number=key.routing, account_number=key.account_number),
                            correlation_id=correlation_id)
    if key.kind == "customer":
        return pb.LookupKey(customer_id=key.customer_id, correlation_id=correlation_id)
    raise ValueError(f"unknown key kind {key.kind!r}; expected one of {', '.join(KINDS)}")


_CODE_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def _code_name(code: int) -> str:
    return _CODE_NAMES.get(code, f"CODE_{code}")


# -- the mix: task weights from --crs-mix, then --tags / --exclude-tags ---------------------------------
SCENARIO_TASKS = {"retail": CrsUser.retail, "ach": CrsUser.ach, "customer": CrsUser.customer,
                  "batch": CrsUser.batch, "stream": CrsUser.stream}


def build_tasks(mix_text: str, tags: list[str] | None, exclude_tags: list[str] | None) -> list[Any]:
    mix = parse_mix(mix_text)
    chosen = {s for s in mix if (not tags or s in tags) and not (exclude_tags and s in exclude_tags)}
    if not chosen:
        raise ValueError(f"no scenario left: --crs-mix {mix_text!r} with --tags {tags} / --exclude-tags "
                         f"{exclude_tags}")
    weights = integer_weights({s: w for s, w in mix.items() if s in chosen})
    return [SCENARIO_TASKS[s] for s, w in weights.items() for _ in range(w)]


@events.test_start.add_listener
def _apply_mix(environment: Any, **_: Any) -> None:
    opts = _opts(environment)
    if opts is None or isinstance(environment.runner, MasterRunner):
        return
    CrsUser.tasks = build_tasks(opts.crs_mix, getattr(opts, "tags", None), getattr(opts, "exclude_tags", None))


# -- the embedded stack (--crs-embedded) ---------------------------------------------------------------
_stack: subprocess.Popen[str] | None = None


@events.init.add_listener
def _start_embedded(environment: Any, **_: Any) -> None:
    global _stack
    opts = _opts(environment)
    if opts is None:
        return
    try:   # fail fast on a bad mix, before anything starts
        build_tasks(opts.crs_mix, getattr(opts, "tags", None), getattr(opts, "exclude_tags", None))
        data_set(opts)
    except ValueError as exc:
        sys.exit(f"locustfile: {exc}")
    if not opts.crs_embedded or isinstance(environment.runner, WorkerRunner):
        return
    if environment.host:
        sys.exit("locustfile: give either --host or --crs-embedded, not both")
    print(f"locustfile: starting the embedded stack ({opts.crs_embedded} customers, "
          f"{opts.crs_embedded_shards} Redis shards, {opts.crs_embedded_workers} node process(es)) ...",
          file=sys.stderr, flush=True)
    argv = [sys.executable, "-m", "loadtests.scenarios.stack", "--customers", str(opts.crs_embedded), "--shards",
            str(opts.crs_embedded_shards), "--workers", str(opts.crs_embedded_workers)]
    _stack = subprocess.Popen(argv + (["--tls"] if opts.crs_embedded_tls else []), cwd=REPO, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, text=True)
    assert _stack.stdout is not None
    line = _stack.stdout.readline()   # gevent-patched: the stack prints READY or exits
    if not line.startswith("READY "):
        _stack.wait(30)
        sys.exit(f"locustfile: the embedded stack did not start (exit code {_stack.returncode})")
    info = json.loads(line[len("READY "):])
    environment.host = info["address"]
    if info.get("tls"):   # workers receive these options from the master with their first spawn message
        tls = info["tls"]
        opts.crs_tls_ca, opts.crs_tls_cert, opts.crs_tls_key = tls["ca"], tls["cert"], tls["key"]
    print(f"locustfile: embedded stack ready at {info['address']} (metrics {info['metrics']}"
          + (", mutual TLS" if info.get("tls") else "") + ")", file=sys.stderr, flush=True)


@events.quitting.add_listener
def _stop_embedded(environment: Any, **_: Any) -> None:
    global _stack
    if _stack is not None and _stack.poll() is None:
        _stack.terminate()
        try:
            _stack.wait(60)
        except subprocess.TimeoutExpired:
            _stack.kill()
    _stack = None


# -- recording for the sweep and the tests (--crs-record) -------------------------------------------
_timeline = Timeline()


@events.test_start.add_listener
def _reset_timeline(environment: Any, **_: Any) -> None:
    global _timeline
    _timeline = Timeline()


@events.request.add_listener
def _record(request_type: str, name: str, response_time: float, response_length: int, exception: Any = None,
            context: Any = None, **_: Any) -> None:
    lookups = int(context.get("lookups", 1)) if isinstance(context, dict) else 1
    kind = ""
    if exception is not None:
        kind = str(getattr(exception, "code", "") or type(exception).__name__)
    _timeline.record(time.time(), name, response_time, lookups=lookups, failed=exception is not None,
                     expected_error=name.endswith("]") and exception is None, failure_kind=kind)


def _write_timeline(environment: Any) -> None:
    opts = _opts(environment)
    if opts is None or not opts.crs_record or isinstance(environment.runner, MasterRunner):
        return
    out = Path(opts.crs_record)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"timeline-{socket.gethostname()}-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_timeline.to_json()))
    tmp.replace(path)


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    _write_timeline(environment)


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    _write_timeline(environment)
