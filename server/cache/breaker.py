"""One shard's circuit breaker: when a Redis shard may serve, and how it comes back.

The policy (DESIGN.md §3-4, docs/decisions.md "A shard that comes back holds nothing a missed delete
left behind") in one place:

- CLOSED: the shard serves. `failure_threshold` consecutive failures open the breaker.
- OPEN: the shard's keys go to PostgreSQL — never to a neighbour, which would serve them stale
  later — until `retry_interval` has passed. Then a probe is due.
- PROBING: exactly one probe runs (the shard passes PING, then what it may hold from deletes it
  missed while we could not reach it is dropped: server/cache/shard.py `_recover`). Only a probe
  that completes closes the breaker; a failed one opens it for another `retry_interval`.
- HELD: an operator marked the shard down in the topology. It never probes while held; `release`
  makes a probe due at once, so a shard marked active again is flushed before it serves too.

This module is pure logic: no Redis, no I/O. The probe is a coroutine function the shard supplies
(server/cache/shard.py), the clock is injected, and starting a probe is an explicit step
(`start_probe_if_due`) the caller takes when it finds the breaker not serving — asking whether a
shard serves (`serving`) never starts anything.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.logs import LIMIT_KEY

log = logging.getLogger("crs.cache")

DEFAULT_FAILURE_THRESHOLD = 3
DEFAULT_RETRY_INTERVAL = 5.0


def error_cause(exc: BaseException) -> str | None:
    """What lies under a shard error, for a log line: the innermost exception it was raised from (or
    during), by class and errno, e.g. `ConnectionRefusedError: ECONNREFUSED (Connection refused)`;
    None when nothing does. Never an exception's text, which may quote a URL."""
    seen = {id(exc)}
    inner: BaseException | None = None
    nxt = exc.__cause__ or exc.__context__
    # asyncio.timeout raises TimeoutError from the CancelledError it used: that one is no cause.
    while nxt is not None and id(nxt) not in seen and not isinstance(nxt, asyncio.CancelledError):
        seen.add(id(nxt))
        inner = nxt
        nxt = nxt.__cause__ or nxt.__context__
    if inner is None:
        return None
    cause = type(inner).__name__
    code = inner.errno if isinstance(inner, OSError) else None
    if isinstance(code, int):
        cause += f": {errno.errorcode.get(code, str(code))} ({os.strerror(code)})"
    return cause


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """How many consecutive failures open a shard's breaker, and how long until it is probed."""

    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    retry_interval: float = DEFAULT_RETRY_INTERVAL

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, not {self.failure_threshold}")
        if not self.retry_interval > 0:
            raise ValueError(f"retry_interval must be positive, not {self.retry_interval}")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"
    HELD = "held"


class Breaker:
    """The state of one shard's breaker. Not thread-safe: one per shard per event loop.

    The hot path reads `serving` (a plain attribute) and calls `record_success` (one store); all
    transitions are method calls so a unit test can drive them with a fake clock.
    """

    __slots__ = ("_clock", "_on_state_change", "_probe", "_probe_task", "delete_failures", "failures", "name",
                 "policy", "retry_at", "serving", "state", "wanted_at")

    def __init__(self, name: str, policy: BreakerPolicy, *, probe: Callable[[], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic,
                 on_state_change: Callable[[str, bool], None] | None = None) -> None:
        self.name = name
        self.policy = policy
        self._probe = probe
        self._clock = clock
        self._on_state_change = on_state_change or (lambda name, up: None)
        self.state = BreakerState.CLOSED
        self.serving = True          # state is CLOSED; kept as an attribute for the read path
        self.failures = 0            # consecutive failures while closed
        self.delete_failures = 0     # consecutive failed deletes: reads that succeed do not reset it
        self.retry_at = 0.0          # OPEN: clock time from which a probe is due
        self.wanted_at = clock()     # not serving: when a command last asked for it (or it went down, came back
                                     # in the topology, was made)
        self._probe_task: asyncio.Task[None] | None = None

    def _enter(self, state: BreakerState) -> None:
        self.state = state
        self.serving = state is BreakerState.CLOSED

    # -- outcomes of commands --------------------------------------------------------------------
    def record_success(self) -> None:
        """The shard answered: the failure streak is over."""
        self.failures = 0

    def record_delete_success(self) -> None:
        self.failures = 0
        self.delete_failures = 0

    def record_delete_failure(self, exc: BaseException) -> None:
        """A delete failed (or was refused). Counted apart from reads: a shard that answers GETs but
        refuses DELs (MISCONF, READONLY after a failover) would otherwise never reach the threshold
        while it keeps serving values whose writes committed."""
        self.delete_failures += 1
        self.record_failure(exc, streak=self.delete_failures)

    def record_failure(self, exc: BaseException, *, streak: int | None = None) -> None:
        """The shard did not answer (connection lost, timeout, refused). Opens at the threshold."""
        self.failures += 1
        if self.state is BreakerState.CLOSED and max(self.failures, streak or 0) >= self.policy.failure_threshold:
            self.mark_down(exc)

    def mark_down(self, exc: BaseException) -> None:
        """Open now, whatever the streak: the node's start-up PING found the copy unreachable."""
        if self.state is not BreakerState.CLOSED:
            return
        self._open()
        # A copy: "shard-0" is the primary, "shard-0/replica-1" a replica; its siblings, if any, serve on.
        log.warning("cache shard copy marked down", extra={"shard": self.name, "error": type(exc).__name__,
                                                           "cause": error_cause(exc),
                                                           "retry_in_s": self.policy.retry_interval})
        self._on_state_change(self.name, False)

    def _open(self) -> None:
        self.delete_failures = 0
        if self.state is BreakerState.CLOSED:
            self.wanted_at = self._clock()
        self.retry_at = self._clock() + self.policy.retry_interval
        self._enter(BreakerState.OPEN)

    @property
    def held(self) -> bool:
        return self.state is BreakerState.HELD

    # -- recovery ------------------------------------------------------------------------------
    @property
    def probing(self) -> bool:
        """A probe task is running (it may outlive a hold/release; a new one waits for it to end)."""
        return self._probe_task is not None

    def probe_due(self) -> bool:
        return (self.state is BreakerState.OPEN and self._probe_task is None
                and self._clock() >= self.retry_at)

    def start_probe_if_due(self) -> bool:
        """Start the recovery probe in the background if one is due; True if this call started it.
        Never more than one at a time. The caller still treats the shard as unavailable: it serves
        only once the probe has completed."""
        self.wanted_at = self._clock()
        return self._start_probe()

    def start_idle_probe(self, idle: float) -> bool:
        """Start the probe if one is due and no command has asked for the shard for `idle` seconds. A node
        process with no traffic for the shard never started one, so it never took the shard back, and its
        crs_cache_shard_up (0) kept its pod's, the minimum over the workers, down: CRSCacheShardDown
        fired on a quiet night. Only then, so that a shard in use comes back as it always did: the
        first lookup that wants it starts the probe."""
        if self._clock() - self.wanted_at < idle:
            return False
        return self._start_probe()

    def _start_probe(self) -> bool:
        if not self.probe_due():
            return False
        self._enter(BreakerState.PROBING)
        self._probe_task = asyncio.get_running_loop().create_task(self._run_probe())
        return True

    async def _run_probe(self) -> None:
        try:
            await self._probe()
        except asyncio.CancelledError:
            if self.state is BreakerState.PROBING:
                self._enter(BreakerState.OPEN)   # still due: whoever runs the shard next probes it
            raise
        except Exception as exc:   # any failure leaves the shard down; never a stuck probe
            if self.state is BreakerState.PROBING:
                self._open()
            log.info("cache shard copy still down", extra={"shard": self.name, "error": type(exc).__name__,
                                                           "cause": error_cause(exc), LIMIT_KEY: (self.name,)})
        else:
            # Held or released while the probe ran: its result is stale, the state decides.
            if self.state is BreakerState.PROBING:
                self.failures = 0
                self._enter(BreakerState.CLOSED)
                log.warning("cache shard copy back", extra={"shard": self.name})
                self._on_state_change(self.name, True)
        finally:
            self._probe_task = None

    # -- the operator (topology) ---------------------------------------------------------------
    def hold(self) -> None:
        """Marked down in the topology: skip the shard (its keys go to PostgreSQL) until released."""
        if self.state is not BreakerState.HELD:
            self._enter(BreakerState.HELD)
            log.warning("cache shard copy marked down by the topology", extra={"shard": self.name})
            self._on_state_change(self.name, False)

    def release(self) -> None:
        """Marked active again, or a new address: it may have missed deletes, so a probe (and its
        flush) is due at once, exactly as for a shard that recovers by itself."""
        self.failures = 0
        self.retry_at = self.wanted_at = self._clock()
        self._enter(BreakerState.OPEN)

    def cancel_probe(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
