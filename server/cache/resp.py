"""A lean, pipelined Redis client for the lookup hot path: GET, MGET and cache fills (SET PX) on one
connection per shard; also each node's periodic DBSIZE + INFO of the shard (server/topology/shard_stats.py).

Why not redis-py here: a redis-py GET costs 50-110 µs of client CPU (pool checkout, retry and
timeout wrappers, one connection per call in flight), a third of a Redis-hit lookup
(docs/benchmarks). This client writes each command at once on a single connection and matches
replies in order (RESP is ordered), so concurrent lookups pipeline naturally and a read costs a few
microseconds plus hiredis parsing. Everything else (writes, deletes, pub/sub, admin) stays on
redis-py, but for the node's shard statistics: redis-py's DBSIZE + INFO (parsed whole) cost ~450 µs
of node CPU per shard per poll, every node polling every shard.

Connecting: the URL's credentials are honoured as redis-py's `from_url` does — `redis://:pw@host`
sends AUTH pw, `redis://user:pw@host` sends AUTH user pw (both URL-decoded), and a /db other than 0
sends SELECT — before the connection carries any command. A refused AUTH or SELECT raises
RespAuthError, whose message names the user and the address, never the password.

Two kinds of failure, kept apart:
- The connection (RespError, a ConnectionError and so one of the tier's shard errors): it could
  not be opened or authenticated, it was lost, a reply came later than `timeout`, or a reply says
  the server cannot serve this connection at all (NOAUTH, WRONGPASS, LOADING — redis-py raises a
  ConnectionError for these too). Every command in flight fails with it and the connection is
  dropped; the next command reconnects.
- One command (RespReplyError, not a ConnectionError): Redis answered that command with an error
  reply (`-WRONGTYPE ...`, `-OOM ...`). Only that command fails; the connection and the commands
  pipelined behind it carry on.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import Final, cast
from urllib.parse import urlparse

import hiredis
from redis.asyncio.connection import parse_url

DEFAULT_PORT: Final = 6379
# Error replies that mean the connection, not the command, is unusable (as redis-py classifies them).
CONNECTION_REPLY_CODES: Final = frozenset({"NOAUTH", "WRONGPASS", "LOADING"})
_MAX_REPLY_TEXT: Final = 200   # error reply text kept in exception messages


class RespError(ConnectionError):
    """The connection failed or timed out; every command in flight on it fails with this."""


class RespAuthError(RespError):
    """The server refused the AUTH or SELECT sent on connect (or asks for authentication)."""


class RespReplyError(Exception):
    """Redis answered one command with an error reply. The connection is fine; `code` is the reply's
    first word (WRONGTYPE, ERR, OOM, ...)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply[:_MAX_REPLY_TEXT])
        self.code = reply.split(" ", 1)[0] if reply else "ERR"


Waiters = collections.deque[tuple[asyncio.Future[object], float]]


class _Protocol(asyncio.Protocol):
    """One connection: its parser and the commands written on it, oldest first."""

    def __init__(self, owner: PipelinedReader) -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.waiters: Waiters = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        try:
            while (reply := self.reader.gets()) is not False:
                if not waiters:
                    self.owner.fail(self, RespError("reply with no command waiting"))
                    return
                fut, _ = waiters.popleft()
                if isinstance(reply, hiredis.ReplyError):
                    error = reply_error(reply, self.owner.address)
                    if isinstance(error, RespError):
                        waiters.appendleft((fut, 0.0))
                        self.owner.fail(self, error)
                        return
                    if not fut.done():
                        fut.set_exception(error)
                elif not fut.done():
                    fut.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.owner.fail(self, RespError(f"protocol error from {self.owner.address}: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.fail(self, RespError("connection lost"))


def reply_error(reply: hiredis.ReplyError, address: str) -> RespReplyError | RespError:
    """What an error reply means: RespReplyError for the one command it answers, or RespError /
    RespAuthError when it says the connection cannot serve at all (CONNECTION_REPLY_CODES)."""
    error = RespReplyError(str(reply))
    if error.code not in CONNECTION_REPLY_CODES:
        return error
    kind = RespError if error.code == "LOADING" else RespAuthError
    failure = kind(f"{address} answered {error}")
    failure.__cause__ = error
    return failure


def command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class PipelinedReader:
    """GET/MGET/SET PX over one pipelined connection. Not thread-safe: one per event loop (node process)."""

    def __init__(self, url: str, *, timeout: float) -> None:
        if urlparse(url).scheme != "redis":
            raise ValueError("the pipelined reader speaks plain redis:// only")
        # Read as redis-py reads it (its from_url): deletes, pub/sub and the recovery probe's FLUSHDB go
        # through redis-py, so a URL must name one database and one user for both. Read apart, `?db=2`
        # (which redis-py takes before the path) put fills in database 0 and every delete in database 2.
        # An empty user name is none; user and password are URL-decoded (from the query too).
        named = parse_url(url)
        self.host = named.get("host") or "127.0.0.1"
        self.port = named.get("port") or DEFAULT_PORT
        self.db = named.get("db") or 0
        self.address = f"{self.host}:{self.port}"
        self.username = named.get("username") or None
        password = named.get("password") or None
        # A user without a password cannot AUTH. Like redis-py, fail when connecting (a shard error the
        # breaker handles), not here: a topology naming such a URL must not stop the node swapping it in.
        self.unusable = (f"the URL for {self.address} names user {self.username!r} without a password"
                          if self.username is not None and password is None else None)
        self._password = password
        self.handshake = self._hello(self.username, password, self.db)
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:   # never the password
        user = f"{self.username}@" if self.username else ""
        return f"<PipelinedReader redis://{user}{self.address}/{self.db}>"

    @staticmethod
    def _hello(username: str | None, password: str | None, db: int) -> list[tuple[str, bytes]]:
        """The commands sent on connect, before any other: AUTH (if a password), SELECT (if db != 0)."""
        steps: list[tuple[str, bytes]] = []
        if password is not None:
            if username is not None:
                steps.append(("AUTH", command(b"AUTH", username.encode(), password.encode())))
            else:
                steps.append(("AUTH", command(b"AUTH", password.encode())))
        if db:
            steps.append(("SELECT", command(b"SELECT", str(db).encode())))
        return steps

    async def _connection(self) -> _Protocol:
        if self._protocol is not None:
            return self._protocol
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _Protocol:
        if self.unusable is not None:
            raise RespAuthError(self.unusable)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                transport, protocol = await loop.create_connection(lambda: _Protocol(self), self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise RespError(f"cannot connect to {self.address}: {type(exc).__name__}") from exc
        protocol.transport = transport   # uvloop may call connection_made after create_connection returns
        try:
            await self._greet(protocol)
            if transport.is_closing():
                raise RespError(f"connection to {self.address} lost while connecting")
        except BaseException:
            if not transport.is_closing():
                transport.abort()
            raise
        self._protocol = protocol
        return protocol

    async def _greet(self, protocol: _Protocol) -> None:
        """AUTH and SELECT, answered before the connection is handed out: no command can overtake them."""
        if not self.handshake:
            return
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[object]] = [loop.create_future() for _ in self.handshake]
        protocol.waiters.extend((f, 0.0) for f in futs)
        protocol.transport.write(b"".join(payload for _, payload in self.handshake))
        try:
            done, _ = await asyncio.wait(futs, timeout=self.timeout, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for f in futs:
                f.cancel()
            raise
        for (step, _), fut in zip(self.handshake, futs, strict=True):
            if fut not in done:
                fut.cancel()
                raise RespError(f"no reply to {step} from {self.address} within {self.timeout}s")
            exc = fut.exception()
            if exc is not None:
                for f in futs:          # mark the rest retrieved
                    if f.done() and not f.cancelled():
                        f.exception()
                    else:
                        f.cancel()
                if isinstance(exc, RespReplyError | RespAuthError):
                    raise RespAuthError(self.refusal(step, exc)) from None
                raise exc   # lost, or LOADING: a connection failure like any other

    def refusal(self, step: str, exc: BaseException) -> str:
        who = f" as user {self.username!r}" if step == "AUTH" and self.username else ""
        if step == "SELECT":
            who = f" of db {self.db}"
        reply = exc.__cause__ if isinstance(exc.__cause__, RespReplyError) else exc
        text = str(reply)
        if self._password:
            text = text.replace(self._password, "***")   # Redis does not echo it; be sure anyway
        return f"{self.address} refused {step}{who}: {text}"

    async def _send(self, payload: bytes) -> object:
        protocol = self._protocol if self._protocol is not None else await self._connection()
        assert protocol.transport is not None
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        protocol.waiters.append((fut, time.monotonic()))
        protocol.transport.write(payload)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout, self._check_age)
        return await fut

    def _check_age(self) -> None:
        """Fail the connection if its oldest command has waited longer than the timeout."""
        self._watchdog = None
        protocol = self._protocol
        if protocol is None or not protocol.waiters:
            return
        age = time.monotonic() - protocol.waiters[0][1]
        if age >= self.timeout:
            self.fail(protocol, RespError(f"no reply from {self.address} within {self.timeout}s"))
        else:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout - age, self._check_age)

    def fail(self, protocol: _Protocol, exc: Exception) -> None:
        """Drop `protocol`'s connection and fail every command in flight on it. A connection that is
        already replaced (its late connection_lost) leaves the current one alone."""
        if self._protocol is protocol:
            self._protocol = None
        waiters, protocol.waiters = protocol.waiters, collections.deque()
        for fut, _ in waiters:
            if not fut.done():
                fut.set_exception(exc)
        if protocol.transport is not None and not protocol.transport.is_closing():
            protocol.transport.abort()

    async def get(self, key: str) -> bytes | None:
        reply = await self._send(command(b"GET", key.encode()))
        assert reply is None or isinstance(reply, bytes)
        return reply

    async def set_px(self, items: list[tuple[str, bytes, int]], *, not_after: float = math.inf) -> bool:
        """SET key value PX ttl_ms for each item, written at once; raises if any fails. Fills go here
        rather than through a connection pool: a 1,000-key batch of misses would otherwise queue for
        pooled connections and time out, which the tier would count against a healthy shard.
        Nothing is written once `not_after` (time.monotonic()) has passed, and False is returned: a
        connection opened meanwhile (connect, AUTH, SELECT) may take two timeouts, and a fill sent
        after its read's window may land after the relay's second delete (docs/decisions.md)."""
        if self._protocol is None:
            await self._connection()
        if time.monotonic() >= not_after:
            return False
        await self.call([command(b"SET", k.encode(), v, b"PX", b"%d" % ttl) for k, v, ttl in items])
        return True

    async def call(self, payloads: list[bytes]) -> list[object]:
        """Write the commands (`command(...)` each) at once; their replies, in order. Raises the first
        failure (the connection's, or RespReplyError for an error reply) once every reply is in."""
        if not payloads:
            return []
        protocol = self._protocol if self._protocol is not None else await self._connection()
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[object]] = [loop.create_future() for _ in payloads]
        now = time.monotonic()
        protocol.waiters.extend((f, now) for f in futs)
        protocol.transport.write(b"".join(payloads))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout, self._check_age)
        try:
            await futs[-1]   # replies arrive in order: the last one settles them all
        finally:
            # Retrieve every outcome (no "exception never retrieved"); raise the first failure.
            errors = [f.exception() for f in futs if f.done() and not f.cancelled()]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futs]

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        reply = await self._send(command(b"MGET", *(k.encode() for k in keys)))
        assert isinstance(reply, list)
        return reply

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None:
            self.fail(self._protocol, RespError("closed"))
