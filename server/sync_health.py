"""grpc.health.v1.Health for the synchronous grpc.server (the hybrid serving model).

Why not grpcio-health-checking's `health.HealthServicer`: its Watch and `set` send each watcher's
answer with gRPC's blocking send while holding the servicer's lock, and a Watch call that ends runs
its close callback, which takes that lock, on the server's one completion-queue thread. When a Watch
starts (sending its first answer under the lock) as another ends, the sender waits for a completion
only that thread can deliver, and that thread waits for the lock: the whole server stops answering,
for good (a rolling-restart test found a node that would not drain; docs/decisions.md "Health on the
sync server"). Clients that check health open and close Watch streams with every connection, so a
node with CRS_MAX_CONNECTION_AGE meets that race all day.

Here nothing sends under a lock and the completion-queue thread never waits: the lock guards only
the statuses and the set of watchers; one sender thread sends each watcher the status of its service
whenever it differs from what that watcher was last sent (a status that flips twice before the sender
runs is sent once, as its latest value: the client acts on the current status only). `set` and
`enter_graceful_shutdown` only record and wake the sender, so calling them from the event loop never
blocks it. A Watch holds no thread while it is open (grpc's non-blocking handler form), so open
health streams do not use up the server's threads.

Because it answers from threads, health here would say SERVING from a process whose event loop is
stuck (a blocking call, a deadlock), which answers no miss, admin call or stream: the loop beats
(`beat`, each second: server/serve.py), and after `stall` seconds without a beat every service
answers NOT_SERVING until it beats again (CRS_LOOP_STALL_SECONDS).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

log = logging.getLogger("crs.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _Watch:
    """One open Watch call: its service, how to send to it, and the status it was last sent."""

    __slots__ = ("send", "sent", "service")

    def __init__(self, service: str, send: Callable[[Any], None]) -> None:
        self.service = service
        self.send = send
        self.sent: int | None = None     # sender thread only


class SyncHealthServicer:
    """Check and Watch over the statuses `set` records; see the module docstring."""

    def __init__(self, stall: float = 0.0) -> None:
        self._stall = stall               # seconds without a beat before the loop counts as stuck; 0 = never
        self._beat: float | None = None   # time.monotonic() of the loop's last beat; None: no beat yet
        self._stalled = False             # sender thread: what it last found (logged on each change)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._status: dict[str, int] = {"": SERVING}
        self._watches: set[_Watch] = set()
        self._dirty = False
        self._frozen = False             # enter_graceful_shutdown: NOT_SERVING for good
        self._closed = False
        self._sender = threading.Thread(target=self._send_changes, name="crs-health", daemon=True)
        self._sender.start()

    def Check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with self._lock:
            status = self._status.get(request.service)
            if status is not None and self._loop_stuck():
                status = NOT_SERVING
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def List(self, request: health_pb2.HealthListRequest,
             context: grpc.ServicerContext) -> health_pb2.HealthListResponse:
        """Not offered, as by grpc.aio's health servicer (the aio model): both models answer alike."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("unreachable: abort raises")

    def Watch(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext,
              send_response_callback: Callable[[Any], None] | None = None) -> None:
        if send_response_callback is None:   # only the non-blocking form below is registered
            raise RuntimeError("SyncHealthServicer.Watch needs grpc's non-blocking handler form")
        watch = _Watch(request.service, send_response_callback)
        with self._lock:
            self._watches.add(watch)
            self._dirty = True
            self._changed.notify()
        # Runs on the completion-queue thread when the call ends: a moment's lock, no send. False: the
        # call has already ended.
        if not context.add_callback(lambda: self._forget(watch)):
            self._forget(watch)

    Watch.experimental_non_blocking = True   # type: ignore[attr-defined]  # grpc: no thread per open Watch

    def set(self, service: str, status: int) -> None:
        with self._lock:
            if self._frozen:
                return
            self._status[service] = status
            self._dirty = True
            self._changed.notify()

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, and no later `set` changes that."""
        with self._lock:
            if self._frozen:
                return
            for service in self._status:
                self._status[service] = NOT_SERVING
            self._frozen = True
            self._dirty = True
            self._changed.notify()

    def beat(self) -> None:
        """The event loop runs (called from it)."""
        self._beat = time.monotonic()

    def _loop_stuck(self) -> bool:
        beat = self._beat
        return bool(self._stall) and beat is not None and time.monotonic() - beat > self._stall

    def close(self) -> None:
        """Stop the sender thread (the server has stopped: no watcher is left to tell)."""
        with self._lock:
            self._closed = True
            self._changed.notify()

    def _forget(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _send_changes(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and not self._closed and not self._stall_changed():
                    # With a stall limit, look at the loop's beat each second (or half stall): watchers learn of a stuck
                    # loop (and of its recovery) with no `set` to wake this thread.
                    self._changed.wait(min(1.0, self._stall / 2) if self._stall else None)
                if self._closed:
                    return
                self._dirty = False
                stuck = self._stalled
                due = [(w, NOT_SERVING if stuck and w.service in self._status else
                        self._status.get(w.service, SERVICE_UNKNOWN)) for w in self._watches]
            for watch, status in due:
                if watch.sent == status:
                    continue
                try:   # blocking until gRPC took it, or the call ended; never under the lock
                    watch.send(health_pb2.HealthCheckResponse(status=status))
                except Exception:   # a broken call must not stop the others' updates
                    log.exception("health watch send failed")
                watch.sent = status


    def _stall_changed(self) -> bool:   # under the lock, sender thread
        stuck = self._loop_stuck()
        if stuck == self._stalled:
            return False
        self._stalled = stuck
        if stuck:
            log.error("the event loop has not run for CRS_LOOP_STALL_SECONDS: health answers NOT_SERVING",
                      extra={"stall_s": self._stall})
        else:
            log.warning("the event loop runs again: health answers as before")
        return True


class ThreadedHealth:
    """SyncHealthServicer behind the awaitable interface the node and its probes use (as grpc.aio's
    health servicer): `set` and `enter_graceful_shutdown` never block the loop."""

    def __init__(self, stall: float = 0.0) -> None:
        self.servicer = SyncHealthServicer(stall)

    def beat(self) -> None:
        self.servicer.beat()

    async def set(self, service: str, status: Any) -> None:
        self.servicer.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self.servicer.enter_graceful_shutdown()

    def close(self) -> None:
        self.servicer.close()
