"""A blocking Redis GET for gRPC threads (the hybrid serving model; docs/decisions.md "Redis hits on the
gRPC thread"). The read policy around it (which copy, what a failure means) is server/cache/thread_reads.py;
the protocol details (commands, error replies, AUTH and SELECT on connect) are the lean client's
(server/cache/resp.py), so both speak to a shard alike."""

from __future__ import annotations

import enum
import errno
import socket
import struct
import threading
import time
from typing import Final, NamedTuple

import hiredis

from server.cache.resp import PipelinedReader, RespAuthError, RespError, RespReplyError, command, reply_error


class Busy(enum.Enum):
    BUSY = "busy"


BUSY: Final = Busy.BUSY   # BlockingReader.get: every connection in use; read on the loop instead


class _Blocking(NamedTuple):
    sock: socket.socket
    parser: hiredis.Reader


def _kernel_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound each send and receive on `sock` in the kernel (SO_SNDTIMEO, SO_RCVTIMEO): a socket left in
    blocking mode makes one recv system call per read, where Python's own timeout polls first (poll,
    then recv: one more system call and one more release of the GIL per GET). A wait past it raises
    BlockingIOError (EAGAIN)."""
    whole = int(seconds)
    micros = max(int((seconds - whole) * 1_000_000), 0 if whole else 1)   # 0 and 0 would mean no limit
    timeval = struct.pack("ll", whole, micros)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class BlockingReader:
    """GET from gRPC threads (the hybrid serving model, docs/decisions.md "Redis hits on the gRPC
    thread"): one request and its reply at a time per connection, at most `max_connections` of them,
    kept for reuse. A thread that finds them all busy is told so (`BUSY`) and hands its read to the
    event loop's PipelinedReader instead: the connections to a shard stay bounded however many
    threads there are. Thread-safe.

    Same address, credentials (AUTH, SELECT on connect, as `reader` sends them), timeout and errors
    as `reader`: RespError (and RespAuthError) when the connection fails, times out or cannot serve,
    RespReplyError for an error reply to the GET (the connection is kept). A connection that failed
    is closed, never reused: a reply that comes late can never answer the next GET."""

    def __init__(self, reader: PipelinedReader, *, max_connections: int) -> None:
        self._reader = reader
        self.address = reader.address
        self.max_connections = max_connections
        self._idle: list[_Blocking] = []
        self._open = 0
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<BlockingReader {self._reader!r} max={self.max_connections}>"

    def get(self, key: str) -> bytes | Busy | None:
        """The value, None on a miss, or BUSY when every connection is in use (or the reader closed)."""
        conn = self._take()
        if conn is None:
            return BUSY
        try:
            self._send(conn, command(b"GET", key.encode()))
            reply = self._reply(conn)
        except RespReplyError:   # Redis answered this GET with an error: the connection is fine
            self._give(conn)
            raise
        except BaseException:
            self._drop(conn)
            raise
        self._give(conn)
        assert reply is None or isinstance(reply, bytes)
        return reply

    def _take(self) -> _Blocking | None:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self._closed or self._open >= self.max_connections:
                return None
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def _give(self, conn: _Blocking) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        self._drop(conn)

    def _drop(self, conn: _Blocking) -> None:
        """Close `conn` for good; its place is free for a new connection."""
        conn.sock.close()
        with self._lock:
            self._open -= 1

    def _connect(self) -> _Blocking:
        r = self._reader
        if r.unusable is not None:
            raise RespAuthError(r.unusable)
        try:
            sock = socket.create_connection((r.host, r.port), timeout=r.timeout)
        except OSError as exc:
            raise RespError(f"cannot connect to {self.address}: {type(exc).__name__}") from exc
        conn = _Blocking(sock, hiredis.Reader())
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)            # blocking: the kernel keeps the timeout (_kernel_timeout)
            _kernel_timeout(sock, r.timeout)
            if r.handshake:
                self._send(conn, b"".join(payload for _, payload in r.handshake))
                for step, _ in r.handshake:
                    try:
                        self._reply(conn)
                    except (RespReplyError, RespAuthError) as exc:   # as PipelinedReader._greet
                        raise RespAuthError(r.refusal(step, exc)) from None
        except BaseException:
            sock.close()
            raise
        return conn

    def _send(self, conn: _Blocking, payload: bytes) -> None:
        try:
            conn.sock.sendall(payload)
        except OSError as exc:
            raise _failed(exc, self.address, self._reader.timeout, "cannot send to") from exc

    def _reply(self, conn: _Blocking) -> object:
        """The next reply on `conn`, waiting at most the reader's timeout for all of it."""
        parser = conn.parser
        deadline = 0.0
        shortened = False   # setsockopt costs system calls: only a reply in several pieces pays them
        try:
            while (reply := parser.gets()) is False:
                if deadline:   # a reply in more than one piece: what is left of the timeout
                    _kernel_timeout(conn.sock, max(deadline - time.monotonic(), 0.001))
                    shortened = True
                else:
                    deadline = time.monotonic() + self._reader.timeout
                data = conn.sock.recv(65536)
                if not data:
                    raise RespError(f"connection to {self.address} lost")
                parser.feed(data)
        except hiredis.ProtocolError as exc:
            raise RespError(f"protocol error from {self.address}: {exc}") from exc
        except OSError as exc:
            if isinstance(exc, RespError):
                raise
            raise _failed(exc, self.address, self._reader.timeout, "no reply from") from exc
        finally:
            if shortened:
                _kernel_timeout(conn.sock, self._reader.timeout)
        if isinstance(reply, hiredis.ReplyError):
            raise reply_error(reply, self.address)
        return reply

    def close(self) -> None:
        """Close the idle connections now and each busy one when its GET ends; later GETs get BUSY."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            conn.sock.close()


def _failed(exc: OSError, address: str, timeout: float, late: str) -> RespError:
    """The RespError for a send or receive on a blocking connection that failed or ran out of time
    (`late`: what a timeout says, "no reply from" or "cannot send to")."""
    if isinstance(exc, TimeoutError) or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return RespError(f"{late} {address} within {timeout}s")
    return RespError(f"connection to {address} failed: {type(exc).__name__}")
