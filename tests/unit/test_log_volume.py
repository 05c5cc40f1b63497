"""Log volume under sustained faults (fifteenth audit): a line that each call, command or poll can
repeat while a fault lasts is written once, then once per interval with how many were left out
(server/logs.py RepeatLimiter). Lines that say a state changed are never limited.

The call-site tests drive each path many times with the clock stopped: on the code before the audit
every one wrote a line per call (a shard at maxmemory refusing every fill: 135 lines/s at 300 lookups/s).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from server import gate, reflection, relay
from server.admin import AdminHandlers
from server.cache.breaker import Breaker, BreakerPolicy
from server.cache.near import NearCache
from server.cache.resp import RespReplyError
from server.cache.shard import ShardGuard, ShardReplyError, ShardUnavailable
from server.caller import Caller
from server.errors import InternalError
from server.feed import tailer
from server.grpc_pool import GrpcThreadPool
from server.logs import LIMIT_KEY, ClientGoneFilter, JsonFormatter, RepeatLimiter, configure_logging
from server.metrics import Metrics
from server.resolver import CachePolicy, Lookup, Resolver
from server.store.envelope import WriteResult
from server.store.read_route import ReadRoute
from tests.clock import Clock

CALLS = 1_000


class Logged:
    """The root logger writing JSON lines through a RepeatLimiter on a clock the test moves."""

    def __init__(self, interval: float = 60.0) -> None:
        self.clock, self.out = Clock(), io.StringIO()
        handler = logging.StreamHandler(self.out)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RepeatLimiter(interval, clock=self.clock))
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger().setLevel(logging.INFO)

    def lines(self, msg: str | None = None) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in self.out.getvalue().splitlines()]
        return [e for e in entries if msg is None or e["msg"] == msg]


@pytest.fixture
def logged() -> Iterator[Logged]:
    root, cygrpc = logging.getLogger(), logging.getLogger("grpc._cython.cygrpc")
    handlers, level, filters = root.handlers[:], root.level, cygrpc.filters[:]
    yield Logged()
    root.handlers[:], cygrpc.filters[:] = handlers, filters
    root.setLevel(level)


# -- the limiter --------------------------------------------------------------------------------
def test_the_first_line_is_written_at_once_the_repeats_once_an_interval_with_their_count(logged: Logged) -> None:
    log = logging.getLogger("crs.test")
    log.warning("shard refused", extra={"shard": "shard-0", LIMIT_KEY: ("shard-0",)})
    assert [(e["shard"], e["suppressed"]) for e in logged.lines()] == [("shard-0", 0)]   # at once
    assert LIMIT_KEY not in logged.lines()[0]
    for _ in range(CALLS):
        logged.clock.now += 0.01                  # 10 s in all: within the interval
        log.warning("shard refused", extra={"shard": "shard-0", LIMIT_KEY: ("shard-0",)})
    assert len(logged.lines()) == 1
    logged.clock.now += 60.0
    log.warning("shard refused", extra={"shard": "shard-0", LIMIT_KEY: ("shard-0",)})
    assert [e["suppressed"] for e in logged.lines()] == [0, CALLS]
    logged.clock.now += 61.0                      # quiet since: nothing was left out
    log.warning("shard refused", extra={"shard": "shard-0", LIMIT_KEY: ("shard-0",)})
    assert [e["suppressed"] for e in logged.lines()] == [0, CALLS, 0]


def test_a_burst_that_stopped_says_how_big_it_was_an_interval_later() -> None:
    """Before, the count of a burst's left-out lines came only with the kind's next line: a burst of a
    thousand errors that then stopped showed as one line, for good."""
    clock = Clock()
    limiter = RepeatLimiter(60.0, clock=clock)
    written: list[logging.LogRecord] = []

    def log(i: int) -> None:
        r = logging.LogRecord("crs.test", logging.WARNING, __file__, 1, "refused %d", (i,), None)
        r.__dict__[LIMIT_KEY] = ("shard-0",)
        if limiter.filter(r):
            written.append(r)

    for i in range(CALLS):
        log(i)
        clock.now += 0.01
    assert limiter.flush(written.append) == 0                 # within the interval: nothing yet
    assert [r.getMessage() for r in written] == ["refused 0"]
    clock.now += 60.0
    assert limiter.flush(written.append) == 1                 # the last one, with the others' count
    assert [(r.getMessage(), r.__dict__["suppressed"]) for r in written] == [
        ("refused 0", 0), (f"refused {CALLS - 1}", CALLS - 2)]
    assert limiter.flush(written.append) == 0                 # said once
    log(CALLS)                                                # within an interval of that line: held
    clock.now += 61.0
    log(CALLS + 1)
    assert [r.__dict__["suppressed"] for r in written] == [0, CALLS - 2, 1]


def test_configure_logging_writes_a_stopped_burst_s_count_by_itself() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", stream=out, repeat_interval=0.2)
        for _ in range(5):
            logging.getLogger("crs.test").warning("refused", extra={LIMIT_KEY: ()})
        deadline = time.monotonic() + 10
        while len(out.getvalue().splitlines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [json.loads(line)["suppressed"] for line in out.getvalue().splitlines()] == [0, 3]
    finally:
        configure_logging("WARNING", stream=io.StringIO())
        root.handlers[:] = handlers
        root.setLevel(level)


def test_each_logger_message_and_key_is_limited_on_its_own(logged: Logged) -> None:
    a, b = logging.getLogger("crs.a"), logging.getLogger("crs.b")
    for _ in range(10):
        a.warning("refused", extra={LIMIT_KEY: ("shard-0",)})
        a.warning("refused", extra={LIMIT_KEY: ("shard-1",)})
        a.warning("other", extra={LIMIT_KEY: ("shard-0",)})
        b.warning("refused", extra={LIMIT_KEY: ("shard-0",)})
    assert [(e["logger"], e["msg"]) for e in logged.lines()] == [
        ("crs.a", "refused"), ("crs.a", "refused"), ("crs.a", "other"), ("crs.b", "refused")]


def test_lines_without_a_key_are_never_limited(logged: Logged) -> None:
    log = logging.getLogger("crs.cache")
    for _ in range(5):
        log.warning("cache shard copy marked down", extra={"shard": "shard-0"})
        log.warning("cache shard copy back", extra={"shard": "shard-0"})
    assert len(logged.lines()) == 10 and all("suppressed" not in e for e in logged.lines())


def test_the_kinds_tracked_are_bounded() -> None:
    clock = Clock()
    limiter = RepeatLimiter(60.0, clock=clock, max_keys=4)

    def record(key: object) -> logging.LogRecord:
        r = logging.LogRecord("crs.test", logging.WARNING, __file__, 1, "refused", (), None)
        r.__dict__[LIMIT_KEY] = key
        return r

    assert all(limiter.filter(record((i,))) for i in range(10))    # past the bound: written, not tracked
    assert len(limiter._seen) == 4
    assert not limiter.filter(record((0,)))                          # a tracked kind is still limited
    clock.now += 61.0
    assert limiter.filter(record((9,))) and len(limiter._seen) == 1   # stale kinds make room


def test_repeats_from_many_threads_are_all_counted() -> None:
    clock = Clock()
    limiter = RepeatLimiter(60.0, clock=clock)
    written: list[logging.LogRecord] = []

    def log_many() -> None:
        for _ in range(CALLS):
            r = logging.LogRecord("crs.test", logging.WARNING, __file__, 1, "refused", (), None)
            r.__dict__[LIMIT_KEY] = ()
            if limiter.filter(r):
                written.append(r)

    threads = [threading.Thread(target=log_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(written) == 1
    clock.now += 60.0
    r = logging.LogRecord("crs.test", logging.WARNING, __file__, 1, "refused", (), None)
    r.__dict__[LIMIT_KEY] = ()
    assert limiter.filter(r) and r.__dict__["suppressed"] == 8 * CALLS - 1


def test_configure_logging_installs_the_limiter_once_with_its_interval() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        out = io.StringIO()
        configure_logging("INFO", stream=out, repeat_interval=30.0)
        configure_logging("INFO", stream=out, repeat_interval=30.0)
        limiters = [f for h in root.handlers for f in h.filters if isinstance(f, RepeatLimiter)]
        assert len(limiters) == 1 and limiters[0].interval == 30.0
        for _ in range(CALLS):
            logging.getLogger("crs.test").warning("refused", extra={LIMIT_KEY: ()})
        assert len(out.getvalue().splitlines()) == 1
        with pytest.raises(ValueError, match="interval"):
            RepeatLimiter(0)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_client_ending_its_streams_fast_gets_one_line_per_method(logged: Logged) -> None:
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    cygrpc.addFilter(ClientGoneFilter())
    for method in ("/crs.v1.ChangeFeedService/Watch", "/crs.v1.LookupService/StreamResolve"):
        for _ in range(100):
            cygrpc.error("ExecuteBatchError raised in core by servicer method [%s]", method)
    assert [e["method"] for e in logged.lines()] == ["/crs.v1.ChangeFeedService/Watch",
                                                     "/crs.v1.LookupService/StreamResolve"]


# -- the call sites ---------------------------------------------------------------------------
async def _probe() -> None:
    pass


@pytest.mark.parametrize("reply", ["OOM command not allowed when used memory > 'maxmemory'.",
                                   "READONLY You can't write against a read only replica."])
def test_a_shard_refusing_every_fill_is_one_line_per_interval_each_refusal_counted(logged: Logged,
                                                                                    reply: str) -> None:
    replies: list[str] = []
    breaker = Breaker("shard-0", BreakerPolicy(), probe=_probe)
    guard = ShardGuard("shard-0", breaker, on_error=lambda name: None, on_reply_error=replies.append,
                       reply_is_failure=False)
    for i in range(CALLS):
        with pytest.raises(ShardReplyError), guard:
            raise RespReplyError(reply) if i % 2 else ResponseError(reply)
    code = reply.split()[0]
    assert len(replies) == CALLS                                  # the metric's count: every one
    assert [(e["shard"], e["error"], e["suppressed"]) for e in logged.lines()] == [("shard-0", code, 0)]
    logged.clock.now += 60.0
    with pytest.raises(ShardReplyError), guard:
        raise RespReplyError(reply)
    assert [e["suppressed"] for e in logged.lines()] == [0, CALLS - 1]


def test_refused_deletes_are_limited_apart_from_refused_fills(logged: Logged) -> None:
    breaker = Breaker("shard-0", BreakerPolicy(failure_threshold=1), probe=_probe)
    fills = ShardGuard("shard-0", breaker, on_error=lambda n: None, on_reply_error=lambda n: None,
                       reply_is_failure=False)
    deletes = ShardGuard("shard-0", breaker, on_error=lambda n: None, on_reply_error=lambda n: None,
                         reply_is_failure=True)
    for _ in range(10):
        with pytest.raises(ShardReplyError), fills:
            raise RespReplyError("READONLY You can't write against a read only replica.")
    with pytest.raises(ShardUnavailable), deletes:
        raise RespReplyError("READONLY You can't write against a read only replica.")
    assert [e["counted_as_failure"] for e in logged.lines("cache shard answered an error reply")] == [False, True]
    assert logged.lines("cache shard copy marked down")            # the state change, as before


def test_a_bug_failing_every_call_logs_its_traceback_once_and_counts_every_call(logged: Logged) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for _ in range(CALLS):
        try:
            raise TypeError("a bug")
        except TypeError as exc:
            code, message, _ = gate.failed_call(exc, "ResolveCard", metrics, 0.0)
        assert (code.name, message) == ("INTERNAL", "internal error")
    try:
        raise KeyError("another bug")
    except KeyError as exc:
        gate.failed_call(exc, "ResolveCard", metrics, 0.0)
    lines = logged.lines("unhandled error")
    assert [(e["rpc"], e["error"]) for e in lines] == [("ResolveCard", "TypeError"), ("ResolveCard", "KeyError")]
    assert "a bug" in lines[0]["trace"]
    metrics.flush()
    assert registry.get_sample_value(
        "crs_rpc_latency_seconds_count", {"method": "ResolveCard", "code": "INTERNAL"}) == CALLS + 1


class ShardDownResolver:
    async def invalidate(self, keys: list[str]) -> bool:
        return False                              # a copy could not be reached: the relay retries


class Store:
    async def set_customer_status(self, request: Any, caller: Caller) -> WriteResult:
        return WriteResult(b"", ["cus:x"], outbox_id=7)

    def __getattr__(self, name: str) -> Any:
        return self.set_customer_status


async def test_writes_while_a_shard_is_down_are_one_line_per_rpc(logged: Logged) -> None:
    handlers = AdminHandlers(store=Store(), resolver=ShardDownResolver())  # type: ignore[arg-type]
    caller = Caller("ops", frozenset({"admin:write"}), "mtls")
    for _ in range(CALLS):
        await handlers.SetCustomerStatus(object(), caller)  # type: ignore[attr-defined]
    await handlers.IssueCard(object(), caller)  # type: ignore[attr-defined]
    lines = logged.lines("invalidation incomplete; the outbox relay will retry")
    assert [(e["rpc"], e["outbox_id"]) for e in lines] == [("SetCustomerStatus", 7), ("IssueCard", 7)]


class DownPool:
    """PostgreSQL out: every query fails to connect."""

    def __init__(self) -> None:
        self.calls = 0

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise ConnectionRefusedError(111, "Connection refused")

    fetchval = fetch = fetchrow


async def _until(condition: Any) -> None:
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never")


async def test_the_outbox_relay_failing_every_pass_is_one_line_per_interval(logged: Logged) -> None:
    pool = DownPool()
    task = asyncio.create_task(relay.run_relay(pool, None, Metrics(CollectorRegistry()),  # type: ignore[arg-type]
                                               delay=0, interval=0, cached_for=1))
    await _until(lambda: pool.calls >= 200)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(logged.lines("outbox relay pass failed; retrying")) == 1


async def test_the_feed_failing_every_retry_is_one_line_per_interval(logged: Logged,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tailer, "RETRY_SECONDS", 0)
    pool, listens = DownPool(), []

    async def connect() -> Any:
        listens.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    feed = tailer.FeedTailer(pool=pool, connect=connect, poll_interval=0.01, batch=10,  # type: ignore[arg-type]
                         queue_size=10, timeout=1)
    task = asyncio.create_task(feed.run())
    await _until(lambda: pool.calls >= 100 and len(listens) >= 100)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(logged.lines("feed read failed; watchers end with UNAVAILABLE")) == 1
    assert len(logged.lines("feed LISTEN unavailable; polling")) == 1


async def test_a_load_failing_on_a_bug_for_every_key_is_one_line_per_kind(logged: Logged) -> None:
    async def broken(_conn: object) -> bytes | None:
        raise TypeError("a bug")

    resolver = Resolver(near=NearCache(max_entries=10, ttl=60), tier=None, policy=CachePolicy(),
                        metrics=Metrics(CollectorRegistry()),
                        route=ReadRoute.primary_only(object(), timeout=2.0, fill_window=60.0))
    for i in range(200):
        with pytest.raises(InternalError):
            await resolver.resolve(Lookup(f"crd:1:{i}", broken, "card"))
    with pytest.raises(InternalError):
        await resolver.resolve(Lookup("acc:1:x", broken, "account"))
    assert [e["kind"] for e in logged.lines("unhandled error while loading")] == ["card", "account"]


def test_reflection_failing_on_a_bug_is_one_line_per_interval(logged: Logged) -> None:
    for _ in range(CALLS):
        try:
            raise TypeError("a bug")
        except TypeError as exc:
            reflection._unexpected(exc)
    assert len(logged.lines("unhandled error")) == 1


def test_a_pool_call_raising_every_time_is_one_line_per_interval(logged: Logged) -> None:
    pool = GrpcThreadPool(1, "t")

    def boom() -> None:
        raise ValueError("grpc's own bug")

    done = threading.Semaphore(0)
    for _ in range(100):
        pool.submit(boom).add_done_callback(lambda _d: done.release())
    for _ in range(100):
        assert done.acquire(timeout=10)
    pool.shutdown()
    assert len(logged.lines("a gRPC call raised out of grpc's own handling")) == 1


async def test_a_copy_that_stays_down_says_so_once_an_interval_not_at_every_probe(logged: Logged) -> None:
    async def refused() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    clock = Clock()
    breaker = Breaker("shard-0", BreakerPolicy(failure_threshold=1, retry_interval=0.5), probe=refused, clock=clock)
    breaker.record_failure(ConnectionRefusedError(111, "Connection refused"))
    for _ in range(50):                           # a probe every retry_interval, each one failing
        clock.now += 0.5
        assert breaker.start_probe_if_due()
        await _until(lambda: not breaker.probing)
    assert len(logged.lines("cache shard copy marked down")) == 1
    assert len(logged.lines("cache shard copy still down")) == 1
