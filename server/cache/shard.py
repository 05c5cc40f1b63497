"""One Redis shard as the tier uses it: its clients, its breaker (server/cache/breaker.py), and the
guards every command to it runs under.

Every command the tier sends a shard is written the same way::

    with shard.guard:                    # ShardUnavailable at once if the breaker is not closed
        value = await shard.read(key)    # a shard error: counted, and raised as ShardUnavailable

The guard is one object per shard, reused by every command (no allocation). It is where the breaker
learns the outcome of each command, and where a request that finds the breaker open takes the
explicit step of starting the recovery probe when one is due (`refuse`). The Redis-hit GET, the one
path where a microsecond shows, spells the same steps out without the `with` statement (`serving`,
`refuse`, `classify`, `record_success`): measured, the context manager cost ~0.5 µs per GET.

Two kinds of error, kept apart (docs/decisions.md "The lean RESP client"):
- shard errors (connection lost or refused, timeout, authentication): the shard may be gone. They
  count towards the breaker's threshold and surface as ShardUnavailable (the key goes to PostgreSQL).
- error replies (`-WRONGTYPE`, `-OOM`, ...: RespReplyError from the lean client, ResponseError from
  redis-py): the shard answered; that one command failed. Logged at warning (a line per shard and
  code per CRS_LOG_REPEAT_INTERVAL: server/logs.py), counted (`on_reply_error`), raised as
  ShardReplyError; the tier treats a failed read as a miss and a failed fill as not done. They are
  not shard failures — the shard is not marked down nor flushed — except under `delete_guard`: a
  shard that refuses a delete may keep serving a value that changed, so for deletes an error reply
  counts like a lost connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Final, Literal, NoReturn, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from server.cache.blocking import BlockingReader
from server.cache.breaker import Breaker, BreakerPolicy
from server.cache.resp import PipelinedReader, RespReplyError
from server.logs import LIMIT_KEY

log = logging.getLogger("crs.cache")

# Raised by redis-py and the lean client for a dead, slow, overloaded or refusing shard. Check
# REPLY_ERRORS first: redis-py's ResponseError is a RedisError too.
SHARD_ERRORS: Final = (RedisError, OSError, asyncio.TimeoutError)
# An error reply to one command (the shard itself answered).
REPLY_ERRORS: Final = (RespReplyError, ResponseError)


class ShardUnavailable(Exception):
    """The shard owning a key cannot be used now; the caller goes to PostgreSQL."""

    def __init__(self, shard: str) -> None:
        super().__init__(f"cache shard {shard} is unavailable")
        self.shard = shard


class ShardReplyError(Exception):
    """The shard answered one command with an error reply (`code`: WRONGTYPE, OOM, ...)."""

    def __init__(self, shard: str, code: str) -> None:
        super().__init__(f"cache shard {shard} answered {code}")
        self.shard = shard
        self.code = code


def _reply_code(exc: BaseException) -> str:
    if isinstance(exc, RespReplyError):
        return exc.code
    if type(exc) is not ResponseError:
        return type(exc).__name__   # redis-py strips the code of the errors it maps to a subclass
    word = str(exc).split(" ", 1)[0]
    return word if word.isupper() else "ERR"   # it strips "ERR " too


class ShardGuard:
    """`with guard:` around one command to a shard. Reusable and re-entrant across tasks: it holds
    no per-command state."""

    __slots__ = ("_breaker", "_name", "_on_error", "_on_reply_error", "_reply_is_failure")

    def __init__(self, name: str, breaker: Breaker, *, on_error: Callable[[str], None],
                 on_reply_error: Callable[[str], None], reply_is_failure: bool) -> None:
        self._name = name
        self._breaker = breaker
        self._on_error = on_error
        self._on_reply_error = on_reply_error
        self._reply_is_failure = reply_is_failure

    def __enter__(self) -> None:
        if not self._breaker.serving:
            self.refuse()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is None:
            if self._reply_is_failure:
                self._breaker.record_delete_success()
            else:
                self._breaker.record_success()
            return False
        error = self.classify(exc)
        if error is None:
            return False
        raise error from exc

    def refuse(self) -> NoReturn:
        """The breaker is not closed: start the recovery probe if one is due (the explicit step; the
        shard still does not serve until it completes), and refuse the command."""
        self._breaker.start_probe_if_due()
        raise ShardUnavailable(self._name)

    def classify(self, exc: BaseException) -> ShardUnavailable | ShardReplyError | None:
        """Record what `exc`, raised by a command, says about the shard, and return the exception the
        caller raises instead of it; None: not the shard's doing (cancelled, a bug), re-raise `exc`."""
        if isinstance(exc, REPLY_ERRORS):
            code = _reply_code(exc)
            self._on_reply_error(self._name)
            # Per command while it lasts (a full shard refuses every fill): limited per shard and code.
            log.warning("cache shard answered an error reply", extra={
                "shard": self._name, "error": code, "counted_as_failure": self._reply_is_failure,
                LIMIT_KEY: (self._name, code, self._reply_is_failure)})
            if not self._reply_is_failure:
                self._breaker.record_success()      # it answered: the connection is fine
                return ShardReplyError(self._name, code)
        elif not isinstance(exc, SHARD_ERRORS):
            return None
        if self._reply_is_failure:
            self._breaker.record_delete_failure(exc)
        else:
            self._breaker.record_failure(exc)
        self._on_error(self._name)
        return ShardUnavailable(self._name)


# Missed deletes are sent to a returning copy this many keys to a DEL.
DEL_CHUNK: Final = 500


async def _unknown() -> Sequence[str] | None:
    return None


def _ignore(*args: object) -> None:
    pass


PRIMARY: Final = "primary"


PTTL_NO_KEY: Final = -2   # PTTL's answer for a key that does not exist
PTTL_NO_TTL: Final = -1   # and for one without a TTL


def copyable(pttl: object) -> bool:
    """Whether a key PTTL answered `pttl` for may be copied to another server (SET PX `pttl`; no PX for
    a key without a TTL). Not one in its last millisecond: Redis answers PTTL 0, and GET its value, while
    its clock reads the key's expiry, and the copy, written without PX, never expired (a card answer
    in good standing long after the card's month ended)."""
    return isinstance(pttl, int) and (pttl > 0 or pttl == PTTL_NO_TTL)


def copy_px(pttl: int) -> int | None:
    """The PX a copy of a `copyable` key is written with: its PTTL, none for a key without a TTL."""
    return pttl if pttl > 0 else None


def copy_label(index: int) -> str:
    """The name of a shard's copy in metrics and logs: `primary`, then `replica-1`, `replica-2`, ..."""
    return PRIMARY if index == 0 else f"replica-{index}"


class Shard:
    """One Redis server holding a shard: one copy of it (server/cache/replicas.py groups a shard's
    copies), with its clients and its own breaker. Lookup reads and fills go through the lean
    pipelined client (server/cache/resp.py) when the URL is redis://; everything else through redis-py.

    `name` is the shard's (what places keys); `copy` says which copy this is; `ident` names both in
    logs and errors (`shard-0` for a primary, `shard-0/replica-1` for a replica)."""

    __slots__ = ("blocking", "breaker", "client", "copy", "delete_guard", "guard", "ident", "missed", "must_flush",
                 "name", "reader", "run_id", "url", "warm_until", "warm_window")

    def __init__(self, name: str, url: str, *, pool_size: int, timeout: float, policy: BreakerPolicy,
                 copy: str = PRIMARY, warm_window: float = 0.0, thread_connections: int = 0,
                 on_state_change: Callable[[str, str, bool], None] = _ignore,
                 on_error: Callable[[str, str], None] = _ignore,
                 on_reply_error: Callable[[str], None] = _ignore,
                 missed: Callable[[], Awaitable[Sequence[str] | None]] = _unknown) -> None:
        """`missed()`: the keys whose deletes a copy that could not be reached may have missed (the
        unsettled outbox rows', server/relay.py), or None when not known; see `_recover`."""
        self.name = name
        self.url = url
        self.copy = copy
        self.ident = name if copy == PRIMARY else f"{name}/{copy}"
        # After its recovery flush a copy is "warming" for warm_window seconds: a miss there asks a
        # sibling copy first (server/cache/replicas.py), so an emptied copy does not send its share
        # of reads to PostgreSQL.
        self.warm_window = warm_window
        self.warm_until = 0.0
        self.missed = missed
        # The redis-server this copy last served from (INFO's run_id; None: not known), and whether the
        # next recovery must flush whatever the server says (marked down and up again by the topology).
        self.run_id: str | None = None
        self.must_flush = False
        # from_url passes the URL's user name, password (URL-decoded) and db to every connection:
        # deletes, pub/sub, the recovery probe and stats all authenticate like the lean client.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
        )
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self.reader = PipelinedReader(url, timeout=timeout) if url.startswith("redis://") else None
        # Hybrid serving model: GETs from gRPC threads (server/cache/thread_reads.py), up to this many connections.
        self.blocking = (BlockingReader(self.reader, max_connections=thread_connections)
                         if self.reader is not None and thread_connections > 0 else None)
        self.breaker = Breaker(self.ident, policy, probe=self._recover,
                               on_state_change=lambda _ident, up: on_state_change(name, copy, up))

        def copy_error(_ident: str) -> None:
            on_error(name, copy)

        def reply_error(_ident: str) -> None:
            on_reply_error(name)

        self.guard = ShardGuard(self.ident, self.breaker, on_error=copy_error, on_reply_error=reply_error,
                                reply_is_failure=False)
        self.delete_guard = ShardGuard(self.ident, self.breaker, on_error=copy_error, on_reply_error=reply_error,
                                       reply_is_failure=True)

    def __repr__(self) -> str:   # the URL may hold a password
        return f"<Shard {self.ident} {self.breaker.state.value}>"

    @property
    def is_up(self) -> bool:
        return self.breaker.serving

    async def server_run_id(self) -> str | None:
        """The run_id of the redis-server behind this copy (new at each start of the server), or None
        where INFO is refused (a managed Redis may rename it)."""
        try:
            info = await self.client.info("server")
        except REPLY_ERRORS:
            return None
        run_id = info.get("run_id")
        return run_id if isinstance(run_id, str) and run_id else None

    async def remember_server(self) -> None:
        """At start, while the copy answers: the server whose contents this node may trust on return."""
        self.run_id = await self.server_run_id()

    async def _recover(self) -> None:
        """The recovery probe: PING, then make sure the copy holds nothing a missed delete left behind
        before it serves again (DESIGN.md section 3). Its keys were never remapped meanwhile.

        - The same redis-server as before (its run_id unchanged: it kept running, so it lost no
          delete it acknowledged), and the keys of every write whose delete is not acknowledged
          everywhere are known (`missed`, the unsettled outbox rows): those keys are deleted here, and
          the rest is kept. A copy marked down under load (timeouts, a slow PING) keeps its contents.
        - Otherwise FLUSHDB: another server (restarted, possibly from a snapshot older than deletes
          it acknowledged; or replaced), a copy marked down and up by the topology, the outbox not
          readable or too long. Nothing it holds can be trusted; it warms from its siblings.
        Per copy: a replica that was away is recovered like a primary, its siblings serving meanwhile."""
        # A put_back while this probe runs sets it again, for the next probe: this one may be past its flush.
        must_flush, self.must_flush = self.must_flush, False
        try:
            await self.client.ping()
            run_id = await self.server_run_id()
            keys = None
            if not must_flush and run_id is not None and run_id == self.run_id:
                keys = await self.missed()
            if keys is None:
                await self.client.flushdb()
                self.warm_until = time.monotonic() + self.warm_window
                log.info("cache shard copy flushed", extra={"shard": self.ident})
            else:
                keys = list(keys)
                for start in range(0, len(keys), DEL_CHUNK):
                    await self.client.delete(*keys[start:start + DEL_CHUNK])
                log.info("cache shard copy kept: the same server; its missed deletes done",
                         extra={"shard": self.ident, "deleted_keys": len(keys)})
        except BaseException:
            self.must_flush = self.must_flush or must_flush
            raise
        self.run_id = run_id

    @property
    def warming(self) -> bool:
        return self.warm_until > 0.0 and time.monotonic() < self.warm_until

    # -- the commands of the read path ---------------------------------------------------------
    async def read(self, key: str) -> bytes | None:
        if self.reader is not None:
            return await self.reader.get(key)
        return cast("bytes | None", await self.client.get(key))

    async def read_many(self, keys: list[str]) -> list[bytes | None]:
        if self.reader is not None:
            return await self.reader.mget(keys)
        return cast("list[bytes | None]", await self.client.mget(keys))

    async def fill(self, items: list[tuple[str, bytes, int]], not_after: float = math.inf) -> bool:
        """SET PX each item; nothing once `not_after` (time.monotonic()) has passed (RedisTier.set_many).
        False when nothing was sent for that reason."""
        if self.reader is not None:
            return await self.reader.set_px(items, not_after=not_after)
        if time.monotonic() >= not_after:
            return False
        async with self.client.pipeline(transaction=False) as pipe:
            for key, value, ttl_ms in items:
                pipe.set(key, value, px=ttl_ms)
            await pipe.execute()
        return True

    # -- the topology --------------------------------------------------------------------------
    def take_out(self) -> None:
        """The topology marks it down: skip it (its keys go to PostgreSQL) until it is marked active."""
        self.breaker.hold()

    def put_back(self) -> None:
        """Marked active again (or its address changed): probed and flushed before it serves."""
        self.must_flush = True
        self.breaker.release()

    async def close(self) -> None:
        self.breaker.cancel_probe()
        if self.reader is not None:
            self.reader.close()
        if self.blocking is not None:
            self.blocking.close()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
