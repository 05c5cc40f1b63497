"""The load generator of one benchmark phase: a separate process, pinned to the client core.

    python -m loadtests.bench.loadgen < spec.json > result.json

The spec (JSON on stdin, written by loadtests/bench/run.py) says what to call and how hard; the
process warms up, measures a window, then measures latency with one call in flight, and prints one
JSON object. It samples the CPU time of the server processes itself, exactly at the window's edges,
so the server CPU-seconds and the work counted cover the same interval.

Kinds: ``unary`` (ResolveCard, or the echo server, which answers the same path), ``batch``
(BatchResolve), ``stream`` (StreamResolve over open bidi streams), ``asyncpg`` (direct PostgreSQL
queries). Unary calls send pre-serialized requests and do not parse the answers (the first answer
is parsed and checked before the phase starts): the client core needs the headroom to keep the
server core busy. Batch and stream answers are parsed, to count per-key errors.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from loadtests.shared import procs
from loadtests.shared.metrics import failed_calls_in, page, scrape_tiers

CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]   # one TCP connection per channel
RESOLVE_CARD = "/crs.v1.LookupService/ResolveCard"
BATCH_RESOLVE = "/crs.v1.LookupService/BatchResolve"
STREAM_RESOLVE = "/crs.v1.LookupService/StreamResolve"
SETTLE_S = 0.2   # between what opens a window and the window (Window.prepare)
CARD_ROW_SQL = ("SELECT token, bin, last4, pan_length, status, expiry, account_id, version FROM cards"
                " WHERE fingerprint_version = $1 AND pan_fingerprint = $2")


def samples(latencies: list[float]) -> list[float]:
    """Latency samples for the JSON result (microsecond resolution keeps it small)."""
    return [round(x, 6) for x in latencies]


class Window:
    """State shared by the workers, and the measured window's edges (CPU, metrics, time)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.server_roots: list[int] = spec.get("server_pids", [])
        self.backend_roots: list[int] = spec.get("backend_pids", [])
        self.server_cpus: set[int] = set(spec.get("server_cpus") or [])
        self.metrics_url: str | None = spec.get("metrics_url")
        self.measuring = False
        self.stop = False
        self.items = 0
        self.calls = 0
        self.errors = 0
        self.error_sample = ""
        self.failure_codes: dict[str, int] = {}   # failed calls in the window, by status code
        self.latencies: list[float] = []
        self.next_key = itertools.count()

    def pin_servers(self) -> None:
        if self.server_cpus:
            procs.pin(self.server_roots + self.backend_roots, self.server_cpus)

    def _scrape_tiers(self) -> dict[str, float]:
        return scrape_tiers([self.metrics_url] if self.metrics_url else [], timeout=2)

    def prepare(self) -> None:
        """What opens a window, done SETTLE_S before it: pin the servers again (PostgreSQL backends may
        have been forked during the warm-up), read the answering tiers' counters, and stop this
        process's cycle collector until `end`. Each of these, at the window's edge, held the client's
        loop for milliseconds (pinning every thread of the server tree ~16 ms, a /metrics scrape and
        its parse as long, a full collection of the client's heap ~16 ms), and the calls due meanwhile
        counted from when they were due: tens of calls at the half-load phases' rates, most of their
        p99. The load generator's own pauses are not the server's latency."""
        self.pin_servers()
        self._tiers0 = self._scrape_tiers()
        gc.collect()
        gc.freeze()      # what the warm-up built is never scanned again
        gc.disable()     # reference counting still frees what the window makes; cycles wait for `end`

    def begin(self) -> None:
        self._srv0 = procs.cpu_snapshot(self.server_roots)
        self._bk0 = procs.cpu_snapshot(self.backend_roots)
        self._cl0 = time.process_time()
        self.items = self.calls = self.errors = 0
        self.failure_codes = {}
        self.latencies = []
        self._t0 = time.perf_counter()
        self.measuring = True

    def end(self, collect: Callable[[], None] | None = None) -> dict[str, Any]:
        self.measuring = False
        t1 = time.perf_counter()
        gc.enable()
        gc.unfreeze()
        if collect is not None:
            collect()
        items, calls, errors = self.items, self.calls, self.errors
        cl1 = time.process_time()
        srv1 = procs.cpu_snapshot(self.server_roots)
        bk1 = procs.cpu_snapshot(self.backend_roots)
        tiers1 = self._scrape_tiers()
        return {
            "items": items, "calls": calls, "errors": errors,
            "wall_s": t1 - self._t0,
            "server_cpu_s": procs.cpu_delta(self._srv0, srv1),
            "backend_cpu_s": procs.cpu_delta(self._bk0, bk1),
            "client_cpu_s": cl1 - self._cl0,
            "latency_s": samples(self.latencies),
            "failure_codes": dict(self.failure_codes),
            "tiers": {k: int(v - self._tiers0.get(k, 0.0)) for k, v in tiers1.items()
                      if v - self._tiers0.get(k, 0.0) > 0},
        }

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        code = getattr(exc, "code", None)
        name = code().name if callable(code) else type(exc).__name__
        self.failure_codes[name] = self.failure_codes.get(name, 0) + 1
        if not self.error_sample:
            self.error_sample = f"{name}: {exc.details()}" if callable(code) else repr(exc)  # type: ignore[attr-defined]


async def _drive(window: Window, spec: dict[str, Any], start_workers: Callable[[], list[asyncio.Task[None]]],
                 idle: Callable[[float], Any]) -> dict[str, Any]:
    window.pin_servers()
    tasks = start_workers()
    try:
        await asyncio.sleep(spec["warmup"])
        await asyncio.to_thread(window.prepare)
        await asyncio.sleep(SETTLE_S)
        window.begin()
        await asyncio.sleep(spec["seconds"])
        result = window.end()
    finally:
        window.stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
    result["idle_latency_s"] = samples(await idle(spec["idle_seconds"]))
    result["error_sample"] = window.error_sample
    return result


# -- gRPC, asyncio ---------------------------------------------------------------------------------
def _channels(grpc: Any, spec: dict[str, Any]) -> list[Any]:
    """Plaintext, or mutual TLS when the spec names the CA and a client certificate (spec["tls"])."""
    tls = spec.get("tls")
    if not tls:
        return [grpc.aio.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) for _ in range(spec["channels"])]
    creds = grpc.ssl_channel_credentials(root_certificates=open(tls["ca"], "rb").read(),
                                         private_key=open(tls["key"], "rb").read(),
                                         certificate_chain=open(tls["cert"], "rb").read())
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "localhost")]
    return [grpc.aio.secure_channel(spec["target"], creds, options=options) for _ in range(spec["channels"])]


async def unary_aio(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from devstack.demo import demo_pan
    from server.proto import crs_pb2 as pb

    reqs = [pb.ResolveCardRequest(pan=demo_pan(i)).SerializeToString() for i in spec["keys"]]
    channels = _channels(grpc, spec)
    calls = [ch.unary_unary(RESOLVE_CARD) for ch in channels]
    pb.Resolution.FromString(await calls[0](reqs[0], timeout=10))   # a real answer, or fail loudly
    w = Window(spec)

    concurrency = spec["concurrency"]
    interval = concurrency / spec["rate"] if spec.get("rate") else 0.0

    def worker(i: int) -> Any:
        return unary_worker(w, calls[i % len(calls)], reqs, interval=interval,
                            first_due=time.perf_counter() + i * interval / concurrency,
                            rpc_error=grpc.aio.AioRpcError)

    async def idle(seconds: float) -> list[float]:
        return await _idle_calls(calls[0], reqs, seconds)

    try:
        return await _drive(w, spec, lambda: [asyncio.create_task(worker(i)) for i in range(spec["concurrency"])],
                            idle)
    finally:
        for ch in channels:
            await ch.close()


async def unary_worker(w: Window, call: Callable[[bytes], Awaitable[Any]], reqs: Sequence[bytes], *,
                       interval: float = 0.0, first_due: float = 0.0,
                       rpc_error: type[BaseException] = Exception) -> None:
    """One worker of a unary phase, one call in flight, until `w.stop`: back to back, or paced (a call
    every `interval` seconds from `first_due`). Paced, a call that is late because the previous one ran
    past its slot is sent at once and the schedule kept, so the rate holds; its latency counts from the
    time it was due, so the wait a slow answer imposed on the calls behind it is measured, not hidden in
    the client (coordinated omission). A call merely woken late by the client's own loop counts from
    when it was sent."""
    perf = time.perf_counter
    due = first_due
    while not w.stop:
        start: float | None = None
        if interval:
            if (wait := due - perf()) > 0:
                await asyncio.sleep(wait)
            else:
                start = due
            due += interval
        req = reqs[next(w.next_key) % len(reqs)]
        t = perf()
        try:
            await call(req)
        except rpc_error as exc:
            if w.measuring:
                w.failed(exc)
            continue
        if w.measuring:
            w.latencies.append(perf() - (t if start is None else start))
            w.items += 1
            w.calls += 1


async def _idle_calls(call: Any, reqs: list[bytes], seconds: float) -> list[float]:
    """Latency of one call at a time for `seconds` (at least 20 calls): the unloaded figure."""
    out: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(out) < 20:
        t = time.perf_counter()
        await call(reqs[len(out) % len(reqs)])
        out.append(time.perf_counter() - t)
    return out


async def batch_aio(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from devstack.demo import demo_pan
    from server.proto import crs_pb2 as pb

    keys, size = spec["keys"], spec["batch_size"]
    reqs = []
    for b in range(max(1, len(keys) // size) * 2):   # several different batches over the key set
        batch = [keys[(b * size + k) % len(keys)] for k in range(size)]
        reqs.append(pb.BatchResolveRequest(keys=[pb.LookupKey(pan=demo_pan(i), correlation_id=str(i))
                                                 for i in batch]).SerializeToString())
    channels = _channels(grpc, spec)
    calls = [ch.unary_unary(BATCH_RESOLVE, response_deserializer=pb.BatchResolveResponse.FromString)
             for ch in channels]
    w = Window(spec)
    deadline, rate = spec.get("deadline"), float(spec.get("rate") or 0.0)

    async def one(i: int) -> None:
        perf = time.perf_counter
        req = reqs[next(w.next_key) % len(reqs)]
        t = perf()
        try:
            resp = await calls[i % len(calls)](req, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            if w.measuring:
                w.failed(exc)
            return
        if w.measuring:
            w.latencies.append(perf() - t)
            bad = sum(1 for r in resp.results if r.code)
            w.calls += 1
            w.items += len(resp.results) - bad
            if bad:
                w.errors += bad
                w.error_sample = w.error_sample or next(r.message for r in resp.results if r.code)

    async def worker(i: int) -> None:   # a closed loop: the next call when the last one ends
        while not w.stop:
            await one(i)

    async def schedule() -> None:
        """An open loop: `rate` calls a second, each sent when due whatever the earlier ones are doing
        (as a payment switch's traffic arrives), so an overloaded node's queue grows as it would."""
        pending: set[asyncio.Task[None]] = set()
        start, sent = time.perf_counter(), 0
        while not w.stop:
            due = int((time.perf_counter() - start) * rate)
            while sent < due:
                task = asyncio.create_task(one(sent))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(0.001)
        await asyncio.gather(*pending, return_exceptions=True)

    async def idle(seconds: float) -> list[float]:
        return await _idle_calls(calls[0], reqs, seconds)

    def start() -> list[asyncio.Task[None]]:
        if rate:
            return [asyncio.create_task(schedule())]
        return [asyncio.create_task(worker(i)) for i in range(spec["concurrency"])]

    try:
        return await _drive(w, spec, start, idle)
    finally:
        for ch in channels:
            await ch.close()


async def stream_aio(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from devstack.demo import demo_pan
    from server.proto import crs_pb2 as pb

    # correlation_id = the key's index. Each stream walks the keys in order from its own offset, so its
    # outstanding requests (at most `window` consecutive keys, window <= keys) have distinct ids and
    # answers may come back in any order.
    reqs = [(str(i), pb.LookupKey(pan=demo_pan(i), correlation_id=str(i)).SerializeToString()) for i in spec["keys"]]
    n = len(reqs)
    channels = _channels(grpc, spec)
    methods = [ch.stream_stream(STREAM_RESOLVE, response_deserializer=pb.LookupResult.FromString) for ch in channels]
    w = Window(spec)

    async def one_stream(i: int, window: int, record: Callable[[float, Any], None],
                         stop: Callable[[], bool]) -> None:
        """Keep `window` requests outstanding on one stream until stop()."""
        call = methods[i % len(methods)]()
        sent: dict[str, float] = {}
        slots = asyncio.Semaphore(window)

        async def writer() -> None:
            j = i * (n // max(1, spec["streams"]))
            while True:
                await slots.acquire()
                if stop():
                    break
                cid, req = reqs[j % n]
                j += 1
                sent[cid] = time.perf_counter()
                await call.write(req)
            await call.done_writing()

        async def reader() -> None:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                record(time.perf_counter() - sent.pop(msg.correlation_id), msg)
                slots.release()

        await asyncio.gather(writer(), reader())

    def record(latency: float, msg: Any) -> None:
        if not w.measuring:
            return
        w.calls += 1
        if msg.code:
            w.errors += 1
            w.error_sample = w.error_sample or msg.message
        else:
            w.items += 1
            w.latencies.append(latency)

    async def guarded(i: int) -> None:
        try:
            await one_stream(i, spec["window"], record, lambda: w.stop)
        except grpc.aio.AioRpcError as exc:
            w.failed(exc)

    async def idle(seconds: float) -> list[float]:
        out: list[float] = []
        deadline = time.perf_counter() + seconds
        await one_stream(0, 1, lambda lat, msg: out.append(lat),
                         lambda: time.perf_counter() >= deadline and len(out) >= 20)
        return out

    try:
        return await _drive(w, spec, lambda: [asyncio.create_task(guarded(i)) for i in range(spec["streams"])], idle)
    finally:
        for ch in channels:
            await ch.close()


# -- gRPC, sync threads ----------------------------------------------------------------------------
def unary_threads(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from devstack.demo import demo_pan
    from server.proto import crs_pb2 as pb

    reqs = [pb.ResolveCardRequest(pan=demo_pan(i)).SerializeToString() for i in spec["keys"]]
    n = len(reqs)
    channels = [grpc.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) for _ in range(spec["channels"])]
    calls = [ch.unary_unary(RESOLVE_CARD) for ch in channels]
    pb.Resolution.FromString(calls[0](reqs[0], timeout=10))
    w = Window(spec)
    conc = spec["concurrency"]
    counts = [0] * conc                       # each thread writes only its own slot: no lock
    lats: list[list[float]] = [[] for _ in range(conc)]
    lock = threading.Lock()

    def worker(i: int) -> None:
        call = calls[i % len(calls)]
        perf = time.perf_counter
        mine = lats[i]
        while not w.stop:
            req = reqs[next(w.next_key) % n]
            t = perf()
            try:
                call(req)
            except grpc.RpcError as exc:
                if w.measuring:
                    with lock:
                        w.failed(exc)
                continue
            if w.measuring:
                mine.append(perf() - t)
                counts[i] += 1

    def collect() -> None:
        w.items = w.calls = sum(counts)
        w.latencies = [x for lat in lats for x in lat]

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conc)]
    w.pin_servers()
    for th in threads:
        th.start()
    try:
        time.sleep(spec["warmup"])
        w.prepare()
        time.sleep(SETTLE_S)
        w.begin()
        time.sleep(spec["seconds"])
        result = w.end(collect)
    finally:
        w.stop = True
        for th in threads:
            th.join()
    out: list[float] = []
    deadline = time.perf_counter() + spec["idle_seconds"]
    while time.perf_counter() < deadline or len(out) < 20:
        t = time.perf_counter()
        calls[0](reqs[len(out) % n])
        out.append(time.perf_counter() - t)
    result["idle_latency_s"] = samples(out)
    result["error_sample"] = w.error_sample
    for ch in channels:
        ch.close()
    return result


# -- h2load (nghttp2's C HTTP/2 load generator) ----------------------------------------------------
H2LOAD_HINT = "the h2load client needs nghttp2's h2load on PATH (Debian: apt-get install nghttp2-client)"


def grpc_frame(message: bytes) -> bytes:
    """A gRPC request body: no compression, the length (big-endian), the message."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def failed_rpcs(url: str | None) -> float:
    """The node's RPCs that ended with a status other than OK, all methods (0 without metrics)."""
    return failed_calls_in(page(url, timeout=2)) if url else 0.0


def _h2load(h2load: str, spec: dict[str, Any], body: Path, log: Path, *, clients: int, streams: int,
            seconds: float, warmup: float = 0.0) -> subprocess.Popen[bytes]:
    # Durations in ms: h2load takes whole numbers with a unit ("0.5" is refused, "500ms" is not).
    warm = ["--warm-up-time", f"{round(warmup * 1000)}ms"] if warmup else []
    cmd = [h2load, "-c", str(clients), "-m", str(streams), "-D", f"{round(seconds * 1000)}ms", *warm,
           "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body), "--log-file", str(log),
           f"http://{spec['target']}{RESOLVE_CARD}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _h2load_log(log: Path, since: float = 0.0, until: float = float("inf")) -> tuple[list[float], int]:
    """(latencies in seconds of the answered, count of the refused) of the requests h2load started in
    [since, until) (epoch seconds); its log has one line per request: start (us since the epoch), HTTP
    status, us taken."""
    latencies, refused = [], 0
    for line in log.read_text().splitlines():
        start_us, status, took_us = line.split("\t")
        if since <= int(start_us) / 1e6 < until:
            if status == "200":
                latencies.append(int(took_us) / 1e6)
            else:
                refused += 1
    return latencies, refused


def unary_h2load(spec: dict[str, Any]) -> dict[str, Any]:
    """ResolveCard from h2load, a C client: per call it costs the client core a fraction of what
    grpc's Python clients do, so a fast server is saturated and a latency is the server's, not the
    client's event loop. One key for every call (h2load posts one body), so only for phases whose
    answer does not depend on the key's variety (echo servers, near-cache and Redis hits). h2load sees
    HTTP statuses, not gRPC's (they come in trailers): a node's non-OK calls are read from its metrics
    across the run and counted as errors; the first answer is checked with grpc before the load."""
    import grpc

    from devstack.demo import demo_pan
    from server.proto import crs_pb2 as pb

    h2load = shutil.which("h2load")
    if h2load is None:
        raise RuntimeError(H2LOAD_HINT)
    if spec.get("tls"):
        raise RuntimeError("the h2load client sends no client certificate: mutual TLS phases use --client aio")
    request = pb.ResolveCardRequest(pan=demo_pan(spec["keys"][0])).SerializeToString()
    with grpc.insecure_channel(spec["target"]) as channel:   # a real answer, or fail loudly
        pb.Resolution.FromString(channel.unary_unary(RESOLVE_CARD)(request, timeout=10))
    clients = spec["channels"]
    streams = max(1, spec["concurrency"] // clients)
    w = Window(spec)
    with tempfile.TemporaryDirectory(prefix="crs-h2load-") as tmp:
        body, log, idle_log = Path(tmp, "body"), Path(tmp, "load.tsv"), Path(tmp, "idle.tsv")
        body.write_bytes(grpc_frame(request))
        w.pin_servers()
        failed0 = failed_rpcs(w.metrics_url)
        proc = _h2load(h2load, spec, body, log, clients=clients, streams=streams, seconds=spec["seconds"],
                       warmup=spec["warmup"])
        try:
            time.sleep(spec["warmup"])
            w.prepare()
            cl0 = procs.cpu_snapshot([proc.pid])
            w.begin()
            since = time.time()
            time.sleep(spec["seconds"])
            until = time.time()
            result = w.end()
            client_cpu = procs.cpu_delta(cl0, procs.cpu_snapshot([proc.pid]))
            output, _ = proc.communicate(timeout=spec["warmup"] + spec["seconds"] + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"h2load exited {proc.returncode}: {output.decode(errors='replace')[-400:]}")
        latencies, refused = _h2load_log(log, since, until)
        answered = len(latencies)
        failed = failed_rpcs(w.metrics_url) - failed0
        idle = _h2load(h2load, spec, body, idle_log, clients=1, streams=1, seconds=max(spec["idle_seconds"], 0.1))
        output, _ = idle.communicate(timeout=spec["idle_seconds"] + 30)
        if idle.returncode != 0:
            raise RuntimeError(f"h2load (idle) exited {idle.returncode}: {output.decode(errors='replace')[-400:]}")
        idle_latencies = _h2load_log(idle_log)[0]
    result.update(items=answered, calls=answered, errors=refused + int(failed), latency_s=samples(latencies),
                  client_cpu_s=client_cpu, idle_latency_s=samples(idle_latencies),
                  error_sample=(f"{refused} HTTP status(es) other than 200, {int(failed)} call(s) not OK"
                                " in the node's metrics" if refused or failed else ""))
    return result


# -- asyncpg ---------------------------------------------------------------------------------------
async def direct_asyncpg(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncpg

    version = spec["fingerprint_version"]
    fps = [bytes.fromhex(h) for h in spec["fingerprints"]]
    n = len(fps)
    conns = [await asyncpg.connect(spec["dsn"]) for _ in range(spec["concurrency"])]
    stmts = [await c.prepare(spec.get("sql") or CARD_ROW_SQL) for c in conns]
    if await stmts[0].fetchrow(version, fps[0]) is None:
        raise SystemExit("asyncpg phase: the first card row is missing")
    w = Window(spec)

    async def worker(i: int) -> None:
        stmt = stmts[i]
        perf = time.perf_counter
        while not w.stop:
            fp = fps[next(w.next_key) % n]
            t = perf()
            try:
                row = await stmt.fetchrow(version, fp)
            except (asyncpg.PostgresError, OSError) as exc:
                if w.measuring:
                    w.failed(exc)
                continue
            if w.measuring:
                w.calls += 1
                if row is None:
                    w.errors += 1
                    w.error_sample = w.error_sample or "card row not found"
                else:
                    w.items += 1
                    w.latencies.append(perf() - t)

    async def idle(seconds: float) -> list[float]:
        out: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(out) < 20:
            t = time.perf_counter()
            await stmts[0].fetchrow(version, fps[len(out) % n])
            out.append(time.perf_counter() - t)
        return out

    try:
        return await _drive(w, spec, lambda: [asyncio.create_task(worker(i)) for i in range(len(stmts))], idle)
    finally:
        for c in conns:
            await c.close()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import uvloop

    kind = spec["kind"]
    if kind == "unary" and spec.get("client") == "threads":
        return unary_threads(spec)
    if kind == "unary" and spec.get("client") == "h2load":
        return unary_h2load(spec)
    runners = {"unary": unary_aio, "batch": batch_aio, "stream": stream_aio, "asyncpg": direct_asyncpg}
    if kind not in runners:
        raise SystemExit(f"loadgen: unknown kind {kind!r}")
    return uvloop.run(runners[kind](spec))


def main() -> int:
    spec = json.load(sys.stdin)
    if spec.get("client_cpus"):
        procs.pin_self(set(spec["client_cpus"]))   # before grpc starts any thread: they inherit it
    result = run(spec)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
