"""The shard breaker's policy as pure logic: a fake clock, a probe that is a coroutine we control, no
servers. And the guard every command runs under, with the same breaker."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from devstack import free_port
from server.cache.breaker import Breaker, BreakerPolicy, BreakerState, error_cause
from server.cache.resp import PipelinedReader, RespError, RespReplyError
from server.cache.shard import ShardGuard, ShardReplyError, ShardUnavailable
from server.logs import JsonFormatter
from tests.clock import Clock

POLICY = BreakerPolicy(failure_threshold=3, retry_interval=5.0)


class Probe:
    """A recovery probe that waits until the test lets it finish (or fail)."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self.outcome: asyncio.Future[Exception | None] | None = None

    async def __call__(self) -> None:
        self.calls += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.outcome = asyncio.get_running_loop().create_future()
        try:
            error = await self.outcome
        finally:
            self.running -= 1
        if error is not None:
            raise error

    async def finish(self, error: Exception | None = None) -> None:
        assert self.outcome is not None and not self.outcome.done()
        self.outcome.set_result(error)
        for _ in range(3):
            await asyncio.sleep(0)


def breaker(policy: BreakerPolicy = POLICY) -> tuple[Breaker, Clock, Probe, list[tuple[str, bool]]]:
    clock, probe, changes = Clock(), Probe(), []
    b = Breaker("shard-0", policy, probe=probe, clock=clock, on_state_change=lambda n, up: changes.append((n, up)))
    return b, clock, probe, changes


def fail(b: Breaker, times: int) -> None:
    for _ in range(times):
        b.record_failure(RespError("connection lost"))


def test_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerPolicy(failure_threshold=0)
    with pytest.raises(ValueError, match="retry_interval"):
        BreakerPolicy(retry_interval=0)


def test_opens_after_threshold_consecutive_failures_only() -> None:
    b, _, _, changes = breaker()
    fail(b, 2)
    b.record_success()                 # the streak is broken
    fail(b, 2)
    assert b.serving and b.state is BreakerState.CLOSED and changes == []
    fail(b, 1)
    assert not b.serving and b.state is BreakerState.OPEN
    assert changes == [("shard-0", False)]
    fail(b, 5)                         # already open: no further notification
    assert changes == [("shard-0", False)]


async def test_probe_is_due_after_the_retry_interval_and_is_an_explicit_step() -> None:
    b, clock, probe, _ = breaker()
    fail(b, 3)
    clock.now += 4
    assert not b.probe_due() and not b.start_probe_if_due()
    clock.now += 1
    assert b.probe_due()
    assert not b.serving and probe.calls == 0   # asking never starts anything
    assert b.start_probe_if_due()
    await asyncio.sleep(0)
    assert probe.calls == 1 and b.state is BreakerState.PROBING
    await probe.finish()


async def test_a_shard_nothing_asks_for_is_probed_after_a_while_and_one_in_use_as_before() -> None:
    """A node process with no traffic for a shard never started its probe, so it never took the shard
    back and its crs_cache_shard_up (0) kept the pod's, the minimum over its workers, down. Once no
    command has asked for the shard for `idle` seconds the node starts the probe itself; while
    lookups want it they start it, as before, and the idle one waits."""
    b, clock, probe, changes = breaker()
    fail(b, 3)                                   # down at 1000
    clock.now += 20
    assert b.probe_due() and not b.start_idle_probe(idle=30)
    clock.now += 10                              # unasked for 30 s
    assert b.start_idle_probe(idle=30)
    await asyncio.sleep(0)
    await probe.finish(RespError("still down"))  # a failed probe: down again, the idle clock runs on
    assert not b.start_idle_probe(idle=30), "not before the retry interval"
    clock.now += 5
    assert b.start_idle_probe(idle=30)
    await asyncio.sleep(0)
    await probe.finish()
    assert b.serving and changes[-1] == ("shard-0", True)
    fail(b, 3)                                   # down again; a lookup wants it 10 s later
    clock.now += 10
    assert b.start_probe_if_due()
    await asyncio.sleep(0)
    await probe.finish(RespError("still down"))
    clock.now += 25                              # asked for 25 s ago: the lookups' own probes go on
    assert not b.start_idle_probe(idle=30) and b.probe_due()
    # A copy just made, or released by the topology: its probe waits for a lookup (or `crs shards`,
    # which flushes a new copy itself) as before; the idle clock starts then.
    fresh, fresh_clock, fresh_probe, _ = breaker()
    fresh.hold()
    fresh_clock.now += 60
    fresh.release()
    assert fresh.probe_due() and not fresh.start_idle_probe(idle=30)
    fresh_clock.now += 30
    assert fresh.start_idle_probe(idle=30)
    await asyncio.sleep(0)
    await fresh_probe.finish()


async def test_exactly_one_probe_at_a_time() -> None:
    b, clock, probe, _ = breaker()
    fail(b, 3)
    clock.now += 5
    started = [b.start_probe_if_due() for _ in range(10)]
    await asyncio.sleep(0)
    assert started.count(True) == 1 and probe.calls == 1
    # Released by the operator while it runs: a new probe is due, but waits for the running one.
    b.release()
    assert not b.start_probe_if_due()
    await probe.finish()
    assert not b.serving                 # the stale probe's success does not close it
    assert b.start_probe_if_due()
    await asyncio.sleep(0)
    assert probe.calls == 2 and probe.most_at_once == 1
    await probe.finish()
    assert b.serving


async def test_serves_again_only_once_the_probe_and_its_flush_completed() -> None:
    b, clock, probe, changes = breaker()
    fail(b, 3)
    clock.now += 5
    b.start_probe_if_due()
    await asyncio.sleep(0)
    assert not b.serving                 # probing: PING + FLUSHDB not done yet
    await probe.finish()
    assert b.serving and b.failures == 0
    assert changes == [("shard-0", False), ("shard-0", True)]


async def test_a_failed_probe_opens_for_another_interval() -> None:
    b, clock, probe, changes = breaker()
    fail(b, 3)
    clock.now += 5
    b.start_probe_if_due()
    await asyncio.sleep(0)
    clock.now += 1
    await probe.finish(RespError("still gone"))
    assert b.state is BreakerState.OPEN and b.retry_at == clock.now + 5
    assert not b.start_probe_if_due()
    clock.now += 5
    assert b.start_probe_if_due()
    await asyncio.sleep(0)
    await probe.finish()
    assert b.serving and changes == [("shard-0", False), ("shard-0", True)]


async def test_held_never_probes_and_release_makes_a_probe_due_at_once() -> None:
    b, clock, probe, changes = breaker()
    b.hold()
    b.hold()
    assert not b.serving and changes == [("shard-0", False)]
    clock.now += 3600
    assert not b.start_probe_if_due() and probe.calls == 0
    b.release()
    assert not b.serving                 # it may have missed deletes: flushed first
    assert b.start_probe_if_due()
    await asyncio.sleep(0)
    await probe.finish()
    assert b.serving


async def test_cancelled_probe_leaves_the_shard_down_and_due() -> None:
    b, clock, _, _ = breaker()
    fail(b, 3)
    clock.now += 5
    b.start_probe_if_due()
    await asyncio.sleep(0)
    b.cancel_probe()
    for _ in range(3):
        await asyncio.sleep(0)
    assert not b.serving and not b.probing and b.probe_due()


# -- the guard ------------------------------------------------------------------------------------
class Counts:
    def __init__(self) -> None:
        self.errors = 0
        self.replies = 0

    def error(self, shard: str) -> None:
        self.errors += 1

    def reply(self, shard: str) -> None:
        self.replies += 1


def guard(b: Breaker, *, reply_is_failure: bool = False) -> tuple[ShardGuard, Counts]:
    counts = Counts()
    return ShardGuard("shard-0", b, on_error=counts.error, on_reply_error=counts.reply,
                      reply_is_failure=reply_is_failure), counts


async def test_guard_counts_shard_errors_and_refuses_an_open_breaker() -> None:
    b, clock, probe, _ = breaker(BreakerPolicy(failure_threshold=2, retry_interval=5.0))
    g, counts = guard(b)
    with g:
        pass
    for exc in (RespError("lost"), RedisConnectionError("refused")):
        with pytest.raises(ShardUnavailable) as info, g:
            raise exc
        assert info.value.__cause__ is exc
    assert counts.errors == 2 and not b.serving
    with pytest.raises(ShardUnavailable), g:
        pytest.fail("the body must not run while the breaker is open")
    assert probe.calls == 0
    clock.now += 5
    with pytest.raises(ShardUnavailable), g:   # refused, and the probe is started
        pass
    await asyncio.sleep(0)
    assert probe.calls == 1
    await probe.finish()
    with g:
        pass


def test_guard_error_reply_fails_the_command_not_the_shard() -> None:
    b, _, _, changes = breaker(BreakerPolicy(failure_threshold=1, retry_interval=5.0))
    g, counts = guard(b)
    for exc in (RespReplyError("WRONGTYPE Operation against a key holding the wrong kind of value"),
                ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")):
        with pytest.raises(ShardReplyError, match="WRONGTYPE"), g:
            raise exc
    assert b.serving and b.failures == 0 and changes == []
    assert counts.replies == 2 and counts.errors == 0


def test_delete_guard_counts_a_refused_delete_as_a_failure() -> None:
    b, _, _, changes = breaker(BreakerPolicy(failure_threshold=1, retry_interval=5.0))
    g, counts = guard(b, reply_is_failure=True)
    with pytest.raises(ShardUnavailable), g:
        raise ResponseError("READONLY You can't write against a read only replica.")
    assert not b.serving and changes == [("shard-0", False)]
    assert counts.replies == 1 and counts.errors == 1


def test_refused_deletes_open_the_breaker_even_while_reads_succeed() -> None:
    """A shard that answers GETs but refuses DELs (READONLY after a failover, MISCONF) must still be
    taken out: it would keep serving values whose writes committed."""
    b, _, _, changes = breaker(POLICY)
    reads, _ = guard(b)
    deletes, _ = guard(b, reply_is_failure=True)
    for _ in range(POLICY.failure_threshold):
        with reads:
            pass                                  # a read succeeds between the refused deletes
        with pytest.raises(ShardUnavailable), deletes:
            raise ResponseError("READONLY You can't write against a read only replica.")
    assert not b.serving and changes == [("shard-0", False)]


def test_a_delete_that_succeeds_ends_the_delete_failure_streak() -> None:
    b, _, _, _ = breaker(POLICY)
    deletes, _ = guard(b, reply_is_failure=True)
    for _ in range(5):
        with pytest.raises(ShardUnavailable), deletes:
            raise ResponseError("MISCONF cannot write")
        with deletes:
            pass
    assert b.serving and b.delete_failures == 0


def test_guard_lets_other_exceptions_through_uncounted() -> None:
    b, _, _, _ = breaker(BreakerPolicy(failure_threshold=1, retry_interval=5.0))
    g, counts = guard(b)
    with pytest.raises(asyncio.CancelledError), g:
        raise asyncio.CancelledError
    with pytest.raises(KeyError), g:
        raise KeyError("a bug, not the shard")
    assert b.serving and counts.errors == 0 and counts.replies == 0


async def test_the_spelled_out_guard_of_the_read_path_decides_the_same() -> None:
    b, clock, probe, _ = breaker(BreakerPolicy(failure_threshold=1, retry_interval=5.0))
    g, counts = guard(b)
    assert isinstance(g.classify(RespReplyError("WRONGTYPE x")), ShardReplyError) and b.serving
    assert g.classify(KeyError("bug")) is None and b.serving
    assert isinstance(g.classify(RespError("lost")), ShardUnavailable) and not b.serving
    assert (counts.replies, counts.errors) == (1, 1)
    clock.now += 5
    with pytest.raises(ShardUnavailable):
        g.refuse()
    await asyncio.sleep(0)
    assert probe.calls == 1
    await probe.finish()
    assert b.serving


async def _refused(url: str) -> BaseException:
    """What the lean client and redis-py raise for a shard whose port refuses connections."""
    reader = PipelinedReader(url, timeout=1.0)
    try:
        await reader.get("k")
    except RespError as exc:
        return exc
    finally:
        reader.close()
    raise AssertionError("the connection was not refused")


async def test_mark_down_opens_at_once_and_the_log_says_the_connection_was_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    """The node's start-up PING (server/topology/watch.py probe_copies): an unreachable copy is down
    from the first scrape, not after its first three lookups; the log line names the refusal (class and
    errno), never the exception's text, which may hold the URL."""
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    lean = await _refused(url)
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
    with pytest.raises(RedisConnectionError) as redis_py:
        await client.ping()
    await client.aclose()
    refused = "ConnectionRefusedError: ECONNREFUSED (Connection refused)"
    assert error_cause(lean) == refused and error_cause(redis_py.value) == refused
    assert error_cause(RespError("no reply")) is None
    try:
        async with asyncio.timeout(0.001):
            await asyncio.sleep(1)
    except TimeoutError as exc:
        assert error_cause(exc) is None, "the CancelledError asyncio.timeout used is no cause"

    b, _, _, changes = breaker()
    with caplog.at_level(logging.INFO, logger="crs.cache"):
        b.mark_down(lean)
        b.mark_down(lean)                  # already down: said once
    assert b.state is BreakerState.OPEN and not b.serving and changes == [("shard-0", False)]
    [record] = [r for r in caplog.records if r.getMessage() == "cache shard copy marked down"]
    line = JsonFormatter().format(record)
    assert json.loads(line)["cause"] == refused and json.loads(line)["error"] == "RespError"
    assert "s3cret" not in line
    held, _, _, held_changes = breaker()
    held.hold()
    held.mark_down(lean)                   # marked down by the topology: stays held
    assert held.state is BreakerState.HELD and held_changes == [("shard-0", False)]


def test_the_threshold_path_logs_the_cause_too(caplog: pytest.LogCaptureFixture) -> None:
    b, _, _, _ = breaker()
    try:
        raise RespError("cannot connect") from TimeoutError()
    except RespError as exc:
        error = exc
    with caplog.at_level(logging.WARNING, logger="crs.cache"):
        for _ in range(3):
            b.record_failure(error)
    [record] = [r for r in caplog.records if r.getMessage() == "cache shard copy marked down"]
    assert json.loads(JsonFormatter().format(record))["cause"] == "TimeoutError"
