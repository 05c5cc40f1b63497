"""Prometheus metrics of a node process.

With several worker processes `crs serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start and
serves the merged view from the parent; a single process serves its own registry.

The two per-call metrics (RPC latency, answering tier) are counted in plain Python first and added
to the Prometheus children by `flush()`, which the node runs every FLUSH_INTERVAL seconds: observing a
prometheus_client histogram costs ~1.4 µs per call (more in multiprocess mode), 4% of a near-cache
hit (docs/benchmarks). A scrape therefore lags by at most FLUSH_INTERVAL. In the hybrid serving model
gRPC threads count while the event loop flushes: each thread counts into its own totals, which only
grow, and `flush()` adds what they gained since the last flush (no lock per call: a shared one,
contended under the GIL, cost ~5% of a BatchResolve's samples).

Several workers (docs/slo.md, "Node metrics with several workers"):
- Every gauge says what a process sees now, so it merges in a `live*` mode: when a worker dies the
  supervisor calls `mark_process_dead`, which deletes that worker's gauge files, and its last values
  (a topology version, a PostgreSQL or shard outage it saw before dying) stop counting. Its counter
  and histogram files stay: a node's counters never go back.
- A gauge without labels whose value a process must learn (`LearnedGauge`) is absent until the process
  has learned it, not 0: a worker that has just started must not pull its node's minimum to 0, and a
  value that does not apply (no read replica, no TLS) must not read as one.
- A labelled series is dropped (`forget_shard`, `forget_copy`) by removing the child; with workers its
  last value would live on in the process's file, so it is overwritten first with the value that the
  merge keeps only when no worker has a real one (+inf under livemin, -inf under livemax), and
  `WorkerMetricsCollector`, which the supervisor serves, leaves infinite gauge samples out.
"""

from __future__ import annotations

import math
import threading
import warnings
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from cryptography import x509
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from server.metric_files import FILES_LOCK

FLUSH_INTERVAL = 1.0

# Buckets centred on the 1 ms target: hits take tens of microseconds, misses a few hundred.
_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)

# What a forgotten series is set to in a worker's file: the merge keeps it only when every worker has
# forgotten the series, and WorkerMetricsCollector then leaves it out. No gauge of ours is infinite.
_FORGOTTEN = {"livemin": math.inf, "livemax": -math.inf}
LiveMode = Literal["livemin", "livemax", "livesum"]


class LearnedGauge:
    """A gauge without labels that this process exports only once `set` gives it a value: absent
    before, where a plain Gauge would export 0 from the start."""

    def __init__(self, name: str, documentation: str, *, mode: LiveMode, registry: CollectorRegistry) -> None:
        self.name = name
        self._documentation = documentation
        self._mode = mode
        self._registry = registry
        self._gauge: Gauge | None = None
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        gauge = self._gauge
        if gauge is None:
            with self._lock:
                if self._gauge is None:
                    self._gauge = Gauge(self.name, self._documentation, multiprocess_mode=self._mode,
                                        registry=self._registry)
                gauge = self._gauge
        gauge.set(value)


def _forget(gauge: Gauge, mode: Literal["livemin", "livemax"], *labelvalues: str) -> None:
    """Drop one labelled series of `gauge` (merged in `mode`), also from a multiprocess merge."""
    child = gauge.labels(*labelvalues)
    # prometheus_client warns that remove() does not reach the files of multiprocess mode: the line
    # below does. (catch_warnings swaps the process's filters: this runs rarely, on the event loop.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Removal of labels has not been implemented", category=UserWarning)
        gauge.remove(*labelvalues)
    # After remove(): a scrape of this process's own registry never sees the value. With workers the
    # child's value lives in this process's file until overwritten.
    child.set(_FORGOTTEN[mode])


class WorkerMetricsCollector(MultiProcessCollector):
    """The workers' files merged (prometheus_client), the retired workers' among them, less the gauge
    series every live worker has forgotten (`_forget`)."""

    def __init__(self, registry: CollectorRegistry, *, path: str) -> None:
        super().__init__(registry, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        with FILES_LOCK:   # not while a dead worker's counts move to the retired files (server/metric_files.py)
            families = list(super().collect())  # type: ignore[no-untyped-call]
        for family in families:
            if family.type == "gauge":
                family.samples = [s for s in family.samples if not math.isinf(s.value)]
            yield family


_Counts = tuple[dict[str, int], dict[tuple[str, str], list[float]]]


def _add(total: _Counts, counts: _Counts) -> None:
    """Add one thread's counts (tier -> lookups, (method, code) -> row) to `total`."""
    tiers, rpcs = total
    for tier, n in counts[0].copy().items():   # copy(): atomic while the thread counts on
        tiers[tier] = tiers.get(tier, 0) + n
    for key, row in counts[1].copy().items():
        into = rpcs.setdefault(key, [0.0] * len(row))
        for i, x in enumerate(row[:]):
            into[i] += x


def _alive(thread: threading.Thread) -> bool:
    """Whether `thread` may still count. A thread threading did not start (a C library's, seen as a
    dummy thread) is taken as alive whatever its is_alive() says or raises: its counts are kept."""
    try:
        return thread.is_alive()
    except RuntimeError:
        return True


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else REGISTRY

        def learned(name: str, documentation: str, mode: LiveMode = "livemin") -> LearnedGauge:
            return LearnedGauge(name, documentation, mode=mode, registry=reg)

        self.rpc_latency = Histogram("crs_rpc_latency_seconds", "RPC handling time by method and status",
                                     ["method", "code"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.lookups = Counter("crs_lookups_total", "Keys answered, by the tier that answered them",
                               ["tier"], registry=reg)
        self.near_refreshes = Counter("crs_near_cache_refreshes_total",
                                      "Near-cache entries reloaded ahead of expiry, by outcome "
                                      "(refreshed, failed, skipped: too many in flight)",
                                      ["outcome"], registry=reg)
        # The hybrid model's two waits (server/grpc_pool.py, server/hybrid.py), sampled once a second:
        # unary calls queued for one of the CRS_SERVING_ACTIVE threads, and calls whose thread waits on
        # the event loop (Redis misses, PostgreSQL, admin), at most 3/4 of CRS_SERVING_THREADS.
        self.calls_queued = learned("crs_grpc_calls_queued", "Unary calls waiting for a gRPC thread to take them"
                                    " (hybrid; sampled each second)", "livesum")
        self.calls_on_loop = learned("crs_grpc_calls_on_loop", "Unary calls whose gRPC thread waits on the event"
                                     " loop: Redis misses, PostgreSQL, admin (hybrid; sampled each second)", "livesum")
        # Hybrid: calls whose turn the pool's watch took, having run an interval without reaching their
        # handler (their request message had not come: server/grpc_pool.py GrpcThreadPool._watch).
        self.turns_revoked = Counter("crs_grpc_turns_revoked_total", "Unary calls that held a gRPC thread's turn"
                                     " without their request message while calls queued; the turn went to"
                                     " another thread (hybrid)", registry=reg)
        self._revoked_seen = 0
        # Hybrid: calls the pools' watch closed UNAVAILABLE, their request message late (CRS_MESSAGE_WAIT_MS).
        self.calls_closed = Counter("crs_grpc_calls_closed_without_message_total", "Calls closed UNAVAILABLE"
                                    " before their handler: their request message had not come CRS_MESSAGE_WAIT_MS"
                                    " (or 100 ms while calls waited for a thread) after a gRPC thread took them"
                                    " (hybrid)", registry=reg)
        self._closed_seen = 0
        # Hybrid: unary calls refused UNAVAILABLE before any work, having waited for a gRPC thread behind
        # a standing queue (server/grpc_pool.py QueueDelay, CRS_SHED_QUEUE_MS): the node is past its capacity.
        self.calls_shed = Counter("crs_calls_shed_total", "Unary calls refused unanswered (UNAVAILABLE): they"
                                  " waited for a gRPC thread behind a standing queue", ["method"], registry=reg)
        self.shard_errors = Counter("crs_cache_shard_errors_total", "Failed Redis operations per shard",
                                    ["shard"], registry=reg)
        # An error reply (WRONGTYPE, OOM, ...) fails one command; unlike shard errors it never marks
        # the shard down (server/cache/shard.py).
        self.shard_reply_errors = Counter("crs_cache_reply_errors_total",
                                          "Redis commands a shard answered with an error reply",
                                          ["shard"], registry=reg)
        # Hybrid: Redis reads a gRPC thread left to the event loop, every thread connection being in use
        # (server/cache/thread_reads.py): if it grows with the load, raise CRS_REDIS_THREAD_CONNECTIONS.
        self.thread_reads_busy = Counter("crs_cache_thread_reads_busy_total",
                                         "Redis reads left to the event loop: every thread connection to "
                                         "the shard was in use", ["shard"], registry=reg)
        # Shard and copy states merge by minimum: 0 when any live worker has it down.
        self.shard_up = Gauge("crs_cache_shard_up", "1 when the shard is in use, 0 when marked down",
                              ["shard"], multiprocess_mode="livemin", registry=reg)
        # Per copy of a shard (primary, replica-1, ...): a shard is up while any copy is.
        self.copy_up = Gauge("crs_cache_copy_up", "1 when the shard copy serves, 0 when marked down",
                             ["shard", "copy"], multiprocess_mode="livemin", registry=reg)
        self.copy_errors = Counter("crs_cache_copy_errors_total", "Failed Redis operations per shard copy",
                                   ["shard", "copy"], registry=reg)
        # A copy's invalidation subscription lost (or failing to subscribe again, once per retry while
        # the copy is down): announcements may have been missed, so the node dropped its near-cache.
        self.invalidation_gaps = Counter("crs_invalidation_gaps_total",
                                         "Invalidation subscriptions lost or not yet renewed, per shard copy; "
                                         "each drops the near-cache", ["shard", "copy"], registry=reg)
        self.outbox_pending = Gauge("crs_outbox_unsettled", "Outbox rows not yet settled by the relay"
                                    " (counted up to 20,000)",
                                    multiprocess_mode="livemax", registry=reg)
        self.outbox_age = Gauge("crs_outbox_oldest_unsettled_age_seconds",
                                "Age of the oldest outbox row not yet settled (0 when none)",
                                multiprocess_mode="livemax", registry=reg)
        # The change feed (docs/feed.md): watchers following it here, and how far this process has read.
        self.feed_watchers = Gauge("crs_feed_watchers", "Watch streams open on this node",
                                   multiprocess_mode="livesum", registry=reg)
        self.feed_catching_up = Gauge("crs_feed_watchers_catching_up",
                                      "Of those, streams reading from PostgreSQL: they fell behind their queue",
                                      multiprocess_mode="livesum", registry=reg)
        self.feed_waiting_turn = Gauge("crs_feed_watchers_waiting_turn",
                                       "Watches behind the live tail waiting for one of the process's catch-up"
                                       " turns (CRS_FEED_CATCH_UP_READS)", multiprocess_mode="livesum", registry=reg)
        self.feed_turns_taken_back = Counter("crs_feed_catch_up_turns_taken_back",
                                             "Catch-up turns taken back from a Watch that held one past its slice"
                                             " while another waited (its consumer slow or stopped)", registry=reg)
        self.feed_head = learned("crs_feed_head_sequence", "Highest feed sequence this node process has read")
        self.database_up = learned("crs_database_up", "1 when PostgreSQL answered the node's last probe")
        # The BIN table (docs/bins.md) this process answers from.
        self.bin_table_version = learned("crs_bin_table_version", "BIN table version this node process answers from")
        self.bin_table_ranges = learned("crs_bin_table_ranges", "Ranges in the BIN table this node process holds")
        # Shard topology (docs/runbooks/resharding.md): the version and phase this process runs, and
        # per shard what `crs shards status` prints.
        self.topology_version = learned("crs_topology_version", "Shard topology version this node process runs")
        self.topology_phase = Gauge("crs_topology_phase", "1 for the phase of the topology this process runs",
                                    ["phase"], multiprocess_mode="livemax", registry=reg)
        self.topology_confirmed = learned("crs_topology_confirmed_timestamp_seconds",
                                          "Unix time this process last checked the topology version")
        self.shard_weight = Gauge("crs_cache_shard_weight", "Shard weight in the target ring (0 when draining)",
                                  ["shard"], multiprocess_mode="livemax", registry=reg)
        self.shard_share = Gauge("crs_cache_shard_share", "Fraction of the keyspace the shard owns in the target ring",
                                 ["shard"], multiprocess_mode="livemax", registry=reg)
        self.shard_topology_state = Gauge("crs_cache_shard_state", "1 for the shard's state in the topology",
                                          ["shard", "state"], multiprocess_mode="livemax", registry=reg)
        self.shard_keys = Gauge("crs_cache_shard_keys", "Keys on the shard (DBSIZE)", ["shard"],
                                multiprocess_mode="livemax", registry=reg)
        self.shard_memory = Gauge("crs_cache_shard_memory_bytes", "Memory the shard uses (INFO used_memory)",
                                  ["shard"], multiprocess_mode="livemax", registry=reg)
        self.shard_hit_ratio = Gauge("crs_cache_shard_hit_ratio",
                                     "keyspace_hits / (hits + misses) since the shard started (INFO stats)",
                                     ["shard"], multiprocess_mode="livemax", registry=reg)
        # This process's asyncpg pool (server/store): connections open, idle among them, and the cap.
        # In use = open - idle; a pod sums its workers (livesum: exited workers drop out).
        self.pg_pool_connections = Gauge("crs_pg_pool_connections", "PostgreSQL connections open in the pool",
                                         multiprocess_mode="livesum", registry=reg)
        self.pg_pool_idle = Gauge("crs_pg_pool_idle_connections", "Open PostgreSQL connections not in use",
                                  multiprocess_mode="livesum", registry=reg)
        self.pg_pool_max = Gauge("crs_pg_pool_max_connections", "Most connections the pool may open",
                                 multiprocess_mode="livesum", registry=reg)
        # Cache-miss reads with CRS_PG_READ_DSN (server/store/read_route.py): which server answered, and
        # how far behind the primary the replica last showed itself to be (absent without a replica).
        self.pg_reads = Counter("crs_pg_reads_total", "Cache-miss reads by route: replica, replica_uncached (primary"
                                " out), primary_replica_behind, primary_replica_failed", ["route"], registry=reg)
        self.pg_replica_staleness = learned("crs_pg_replica_staleness_seconds",
                                            "Age of the newest primary WAL position the read replica has replayed",
                                            "livemax")
        # notAfter of the certificate chain the gRPC port serves (earliest of the chain); absent without TLS.
        self.tls_cert_expiry = learned("crs_tls_certificate_expiry_timestamp_seconds",
                                       "Unix time the earliest certificate of the served chain expires")
        # A fingerprint-key rotation under way (docs/security.md): lookups that found their row only under
        # another configured key version than the node's, answered uncached (server/lookup.py).
        self.other_key_version = Counter("crs_lookups_other_key_version_total",
                                         "Card and account lookups found only under another fingerprint key"
                                         " version than this node's (answered, not cached)", ["kind"], registry=reg)
        # A cache-miss answer whose read took longer than its fill window (server/store/read_route.py):
        # served, not cached. Growing steadily: reads slower than CRS_REINVALIDATE_DELAY - CRS_REDIS_TIMEOUT.
        self.fills_dropped = Counter("crs_cache_fills_dropped_total",
                                     "Cache-miss answers served but not cached: their read finished past its"
                                     " fill window", registry=reg)
        self.migration_copies = Counter("crs_cache_migration_copies_total",
                                        "Values a read copied from a key's old owner to its new one while keys move",
                                        registry=reg)
        self._bounds = [*_LATENCY_BUCKETS, float("inf")]
        # Per thread: tier -> lookups, and (method, code) -> [count per bucket..., sum of seconds]. A
        # thread that ended leaves its counts to `_ended` at the next flush (a StreamResolve's reader
        # is a thread of its own: kept, they grew by one per stream, and so did every flush).
        self._local = threading.local()
        self._threads: list[tuple[threading.Thread, _Counts]] = []
        self._threads_lock = threading.Lock()   # taken once per thread, on its first count
        self._ended: _Counts = ({}, {})
        self._flushed_tiers: dict[str, int] = {}
        self._flushed_rpcs: dict[tuple[str, str], list[float]] = {}

    def _counts(self) -> _Counts:
        try:
            mine: _Counts = self._local.counts
        except AttributeError:
            mine = self._local.counts = ({}, {})
            with self._threads_lock:
                self._threads.append((threading.current_thread(), mine))
        return mine

    def fill_dropped(self) -> None:
        self.fills_dropped.inc()

    def near_refresh(self, outcome: str) -> None:
        self.near_refreshes.labels(outcome).inc()

    def tier_hit(self, tier: str, n: int = 1) -> None:
        counts = self._counts()[0]
        counts[tier] = counts.get(tier, 0) + n

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        rows = self._counts()[1]
        row = rows.get((method, code))
        if row is None:
            row = rows[(method, code)] = [0.0] * (len(self._bounds) + 1)
        row[bisect_left(self._bounds, seconds)] += 1   # buckets are "less or equal" bounds
        row[-1] += seconds

    def feed_state(self, watchers: int, catching_up: int, head: int) -> None:
        self.feed_watchers.set(watchers)
        self.feed_catching_up.set(catching_up)
        self.feed_head.set(head)

    def flush(self) -> None:
        """Move what the per-call counts gained since the last flush into the Prometheus metrics."""
        with self._threads_lock:
            ended, live, kept = [], [], []
            for entry in self._threads:   # a thread that ended counts no more: its counts are final
                if _alive(entry[0]):
                    kept.append(entry)
                    live.append(entry[1])
                else:
                    ended.append(entry[1])
            self._threads = kept
        for counts in ended:
            _add(self._ended, counts)
        tiers: dict[str, int] = dict(self._ended[0])
        rpcs = {key: row[:] for key, row in self._ended[1].items()}
        for counts in live:
            _add((tiers, rpcs), counts)
        for tier, n in tiers.items():
            if n > (before := self._flushed_tiers.get(tier, 0)):
                self.lookups.labels(tier).inc(n - before)
            self._flushed_tiers[tier] = n
        for (method, code), row in rpcs.items():
            before_row = self._flushed_rpcs.get((method, code), [0.0] * len(row))
            gained = [x - y for x, y in zip(row, before_row, strict=True)]
            self._flushed_rpcs[(method, code)] = row
            if not any(gained[:-1]):
                continue
            child: Any = self.rpc_latency.labels(method, code)
            # prometheus_client has no public "add n observations"; its children keep one value per
            # bucket (non-cumulative) and the sum, which is what we add to.
            for i, count in enumerate(gained[:-1]):
                if count:
                    child._buckets[i].inc(count)
            child._sum.inc(gained[-1])

    def pg_read(self, route: str) -> None:
        self.pg_reads.labels(route).inc()

    def serving_waits(self, queued: int, on_loop: int, revoked: int, closed: int) -> None:
        """Sampled each second: the pool's queue, the calls waiting on the loop, and the pools' running
        counts of turns taken from calls without their message, and of such calls closed."""
        self.calls_queued.set(queued)
        self.calls_on_loop.set(on_loop)
        if revoked > self._revoked_seen:
            self.turns_revoked.inc(revoked - self._revoked_seen)
            self._revoked_seen = revoked
        if closed > self._closed_seen:
            self.calls_closed.inc(closed - self._closed_seen)
            self._closed_seen = closed

    def pg_pool(self, size: int, idle: int, maximum: int) -> None:
        self.pg_pool_connections.set(size)
        self.pg_pool_idle.set(idle)
        self.pg_pool_max.set(maximum)

    def tls_certificate(self, pem: bytes) -> None:
        """Record when the served chain (PEM, leaf first) stops being valid: its earliest notAfter."""
        chain = x509.load_pem_x509_certificates(pem)
        self.tls_cert_expiry.set(min(c.not_valid_after_utc.timestamp() for c in chain))

    def shard_error(self, shard: str) -> None:
        self.shard_errors.labels(shard).inc()

    def thread_read_busy(self, shard: str) -> None:
        self.thread_reads_busy.labels(shard).inc()

    def shard_reply_error(self, shard: str) -> None:
        self.shard_reply_errors.labels(shard).inc()

    def shard_state(self, shard: str, up: bool) -> None:
        self.shard_up.labels(shard).set(1 if up else 0)

    def copy_state(self, shard: str, copy: str, up: bool) -> None:
        self.copy_up.labels(shard, copy).set(1 if up else 0)

    def forget_shard(self, shard: str, *, copies: Iterable[str], states: Iterable[str]) -> None:
        """The shard left the topology: its gauges go. Its counters stay (a counter never goes back; a
        series that stops growing is what a dashboard expects of a shard that is gone)."""
        _forget(self.shard_up, "livemin", shard)
        for copy in copies:
            self.forget_copy(shard, copy)
        for gauge in (self.shard_weight, self.shard_share, self.shard_keys, self.shard_memory, self.shard_hit_ratio):
            _forget(gauge, "livemax", shard)
        for state in states:
            _forget(self.shard_topology_state, "livemax", shard, state)

    def forget_copy(self, shard: str, copy: str) -> None:
        """A replica removed from the shard (or the shard removed)."""
        _forget(self.copy_up, "livemin", shard, copy)

    def copy_error(self, shard: str, copy: str) -> None:
        self.copy_errors.labels(shard, copy).inc()

    def invalidation_gap(self, shard: str, copy: str) -> None:
        self.invalidation_gaps.labels(shard, copy).inc()

    def copied(self, n: int) -> None:
        if n:
            self.migration_copies.inc(n)
