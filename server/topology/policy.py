"""How fast and how patiently a move runs: `MigrationPolicy`, derived from the settings.

No Redis or PostgreSQL import: the `crs shards` parser quotes these defaults in its --help, and the
node's watcher uses the same copy budget as the driver.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from server.settings import Settings

# How long apply/abort wait for every live node to run a new version: at least a minute (a pod being
# rescheduled, a long GC pause), and at least three leases (a node that just missed a heartbeat).
MIN_WAIT_TIMEOUT = 60.0
WAIT_LEASES = 3
# While waiting, look at the heartbeats this many times per node poll interval (CRS_TOPOLOGY_POLL_INTERVAL),
# and at least every MAX_NODE_POLL seconds: a node's new version is seen soon after it reports it.
LOOKS_PER_NODE_POLL = 2
MAX_NODE_POLL = 0.5
# A copy is kept only if read and written within this fraction of CRS_REINVALIDATE_DELAY, so the relay's
# second delete of a concurrent write always lands after it (docs/runbooks/resharding.md).
COPY_BUDGET_FRACTION = 0.5
# The driver's Redis commands are whole SCAN steps and pipelines of a batch of keys, not single lookups:
# this many lookup timeouts (CRS_REDIS_TIMEOUT), and never under MIN_REDIS_TIMEOUT seconds.
REDIS_TIMEOUT_FACTOR = 8
MIN_REDIS_TIMEOUT = 2.0


@dataclass(frozen=True)
class MigrationPolicy:
    rate: float = 20_000.0                  # keys examined per second, all shards together
    batch: int = 500                        # SCAN COUNT
    lease: float = 10.0                     # a node heartbeat older than this is a node that is gone
    wait_timeout: float = MIN_WAIT_TIMEOUT  # how long to wait for live nodes to run a new version
    poll: float = 0.2                       # how often to look at the heartbeats while waiting
    copy_budget: float = 0.25               # a copy is kept only if read and written within this many seconds
    redis_timeout: float = 5.0              # per Redis command of the driver

    @classmethod
    def from_settings(cls, s: Settings, *, rate: float | None = None, batch: int | None = None,
                      wait_timeout: float | None = None) -> MigrationPolicy:
        return cls(rate=float(rate or s.migration_rate), batch=batch or s.migration_batch, lease=s.topology_lease,
                   wait_timeout=wait_timeout if wait_timeout is not None
                   else max(MIN_WAIT_TIMEOUT, WAIT_LEASES * s.topology_lease),
                   poll=min(MAX_NODE_POLL, s.topology_poll_interval / LOOKS_PER_NODE_POLL),
                   copy_budget=s.reinvalidate_delay * COPY_BUDGET_FRACTION,
                   redis_timeout=max(MIN_REDIS_TIMEOUT, REDIS_TIMEOUT_FACTOR * s.redis_timeout))

    def within_nodes(self, reinvalidate_delays: Iterable[float | None]) -> MigrationPolicy:
        """This policy with a copy budget inside every node's: half the shortest CRS_REINVALIDATE_DELAY
        among this command's and the live nodes' (None: a node that does not report it)."""
        budgets = [d * COPY_BUDGET_FRACTION for d in reinvalidate_delays if d is not None]
        return replace(self, copy_budget=min([self.copy_budget, *budgets]))
