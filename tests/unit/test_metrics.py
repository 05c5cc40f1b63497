"""Per-call counts reach the Prometheus histogram and counter exactly at flush(); with several
workers, the supervisor's merged view holds what live workers see (server/metrics.py)."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, multiprocess, values

from server.metrics import LearnedGauge, Metrics, WorkerMetricsCollector


def test_batched_counts_match_direct_observation() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    samples = [0.00004, 0.00005, 0.0002, 0.0007, 0.003, 2.0]
    for s in samples:
        m.observe_rpc("ResolveCard", "OK", s)
    m.tier_hit("l1")
    m.tier_hit("l1")
    m.tier_hit("l3")
    assert registry.get_sample_value("crs_rpc_latency_seconds_count", {"method": "ResolveCard", "code": "OK"}) is None
    m.flush()
    labels = {"method": "ResolveCard", "code": "OK"}
    assert registry.get_sample_value("crs_rpc_latency_seconds_count", labels) == len(samples)
    assert abs(registry.get_sample_value("crs_rpc_latency_seconds_sum", labels) - sum(samples)) < 1e-9
    # "le" buckets are cumulative and inclusive: 0.00005 falls in le=5e-05.
    assert registry.get_sample_value("crs_rpc_latency_seconds_bucket", labels | {"le": "5e-05"}) == 2
    assert registry.get_sample_value("crs_rpc_latency_seconds_bucket", labels | {"le": "0.001"}) == 4
    assert registry.get_sample_value("crs_rpc_latency_seconds_bucket", labels | {"le": "1.0"}) == 5
    assert registry.get_sample_value("crs_rpc_latency_seconds_bucket", labels | {"le": "+Inf"}) == 6
    assert registry.get_sample_value("crs_lookups_total", {"tier": "l1"}) == 2
    m.flush()   # nothing new: nothing added twice
    assert registry.get_sample_value("crs_rpc_latency_seconds_count", labels) == len(samples)
    assert registry.get_sample_value("crs_lookups_total", {"tier": "l3"}) == 1



def test_threads_that_ended_leave_their_counts_and_are_not_kept() -> None:
    """A StreamResolve's reader is a thread of its own, one per stream that meets a miss: the counts of
    threads that ended stay in the totals, and their per-thread entries go at the next flush (kept,
    they grew by one per stream, and every flush walked them all)."""
    registry = CollectorRegistry()
    m = Metrics(registry)

    def count() -> None:
        m.tier_hit("l1")
        m.observe_rpc("StreamResolve", "OK", 0.001)

    for _ in range(50):
        thread = threading.Thread(target=count)
        thread.start()
        thread.join()
    m.tier_hit("l1")   # this thread, alive throughout
    m.flush()
    assert registry.get_sample_value("crs_lookups_total", {"tier": "l1"}) == 51
    labels = {"method": "StreamResolve", "code": "OK"}
    assert registry.get_sample_value("crs_rpc_latency_seconds_count", labels) == 50
    assert len(m._threads) == 1
    for _ in range(3):
        thread = threading.Thread(target=count)
        thread.start()
        thread.join()
    m.flush()
    m.flush()   # nothing new: nothing added twice
    assert registry.get_sample_value("crs_lookups_total", {"tier": "l1"}) == 54
    assert registry.get_sample_value("crs_rpc_latency_seconds_count", labels) == 53
    assert len(m._threads) == 1

# --- several workers: prometheus_client's multiprocess files, merged as the supervisor serves them ---

class Workers:
    """Simulated worker processes writing metric files into one directory, as `crs serve` workers do
    (each a prometheus_client MultiProcessValue with its own pid), and the supervisor's merged view."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.directory = directory
        self._monkeypatch = monkeypatch
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        self._values: dict[int, Any] = {}

    @contextmanager
    def worker(self, pid: int) -> Iterator[None]:
        """Metric values created inside belong to worker `pid` (prometheus_client picks the value class
        when a value is created)."""
        value_class = self._values.setdefault(pid, values.MultiProcessValue(lambda: pid))
        self._monkeypatch.setattr(values, "ValueClass", value_class)
        yield

    def metrics(self, pid: int) -> Metrics:
        with self.worker(pid):
            return Metrics(CollectorRegistry())

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        registry = CollectorRegistry()
        WorkerMetricsCollector(registry, path=str(self.directory))
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in registry.collect() for s in f.samples}

    def value(self, name: str, **labels: str) -> float | None:
        return self.scrape().get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workers:
    return Workers(tmp_path, monkeypatch)


def _set_every_gauge(m: Metrics, value: float) -> set[str]:
    """Give every gauge of `m` a value (labelled ones one series); their names."""
    names = set()
    for attr in vars(m).values():
        if isinstance(attr, LearnedGauge):
            attr.set(value)
            names.add(attr.name)
        elif isinstance(attr, Gauge):
            child = attr.labels(*(["x"] * len(attr._labelnames))) if attr._labelnames else attr
            child.set(value)
            names.add(attr._name)
    return names


def test_a_dead_workers_gauges_leave_the_merge_and_its_counters_stay(workers: Workers) -> None:
    """Every gauge says what a live process sees: none outlives its worker (the supervisor's
    mark_process_dead); counters and histograms do, so a node's totals never go back."""
    dead = workers.metrics(101)
    with workers.worker(101):
        gauges = _set_every_gauge(dead, 11)
        dead.tier_hit("l2", 5)
        dead.observe_rpc("ResolveCard", "OK", 0.001)
        dead.flush()
    assert {name for name, _ in workers.scrape()} >= gauges
    multiprocess.mark_process_dead(101, str(workers.directory))
    left = {name for name, _ in workers.scrape()}
    assert not left & gauges, f"gauges of a dead worker still merged: {sorted(left & gauges)}"
    assert workers.value("crs_lookups_total", tier="l2") == 5
    assert workers.value("crs_rpc_latency_seconds_count", method="ResolveCard", code="OK") == 1


def test_the_files_of_dead_workers_do_not_pile_up(workers: Workers) -> None:
    """Fourteenth audit: each worker that died left its counter and histogram files for the pod's life,
    and every scrape read them all: a worker killed 10 times, 9 files -> 26; 1,000 dead workers, 72 MB
    of the pod's 256 MiB /tmp (k8s/base; past it the pod is evicted) and a 1.6 s scrape. The
    supervisor's `_forget_worker` folds a dead worker's counts into one file per kind: the files stay
    as many as the live workers' plus those, the totals unchanged."""
    from server.serve import _forget_worker

    live = workers.metrics(1)
    with workers.worker(1):
        live.tier_hit("l1", 7)
        live.flush()
    for pid in range(100, 130):
        dead = workers.metrics(pid)
        with workers.worker(pid):
            dead.tier_hit("l2", 2)
            dead.observe_rpc("ResolveCard", "OK", 0.001)
            dead.observe_rpc("GetCustomer", "NOT_FOUND", 0.3)
            dead.shard_error("shard-1")
            dead.flush()
        before = _totals(workers.scrape())
        _forget_worker(workers.directory, pid)
        assert _totals(workers.scrape()) == before, f"the totals changed when worker {pid} was retired"
    files = sorted(p.name for p in workers.directory.iterdir())
    assert len(files) <= 2 + 5, f"the dead workers' files are still there: {files}"
    assert workers.value("crs_lookups_total", tier="l2") == 60
    assert workers.value("crs_lookups_total", tier="l1") == 7
    assert workers.value("crs_cache_shard_errors_total", shard="shard-1") == 30
    assert workers.value("crs_rpc_latency_seconds_count", method="GetCustomer", code="NOT_FOUND") == 30
    assert workers.value("crs_rpc_latency_seconds_bucket", method="ResolveCard", code="OK", le="0.001") == 30
    assert workers.value("crs_rpc_latency_seconds_bucket", method="GetCustomer", code="NOT_FOUND", le="0.1") == 0


def test_a_dead_worker_whose_counts_cannot_be_folded_keeps_its_file(workers: Workers) -> None:
    """The fold writes a file (the directory may be full): failing, it leaves the worker's file as it
    was, counted, and never raises into the supervisor's loop."""
    from server.serve import _forget_worker

    dead = workers.metrics(101)
    with workers.worker(101):
        dead.tier_hit("l2", 3)
        dead.flush()
    (workers.directory / "counter_retired.db.new").mkdir()   # os.replace cannot put a file there
    (workers.directory / "counter_retired.db.new" / "x").touch()
    _forget_worker(workers.directory, 101)
    assert (workers.directory / "counter_101.db").exists()
    assert workers.value("crs_lookups_total", tier="l2") == 3


def _totals(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[Any, float]:
    """A scrape's counter and histogram samples: what must never go back."""
    return {k: v for k, v in scrape.items() if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}


def test_the_merge_of_live_workers_ignores_a_dead_ones_last_state(workers: Workers) -> None:
    """The outside check: a worker dead on topology 11, with PostgreSQL and a shard down, pinned the
    node at that state (CRSTopologyNodeBehind, CRSDatabaseUnreachable, CRSCacheShardDown)."""
    dead, live = workers.metrics(101), workers.metrics(102)
    with workers.worker(101):
        dead.topology_version.set(11)
        dead.topology_confirmed.set(1000.0)
        dead.database_up.set(0)
        dead.shard_state("shard-1", False)
    with workers.worker(102):
        live.topology_version.set(15)
        live.topology_confirmed.set(2000.0)
        live.database_up.set(1)
        live.shard_state("shard-1", True)
    assert workers.value("crs_topology_version") == 11 and workers.value("crs_database_up") == 0
    multiprocess.mark_process_dead(101, str(workers.directory))
    assert workers.value("crs_topology_version") == 15
    assert workers.value("crs_topology_confirmed_timestamp_seconds") == 2000.0
    assert workers.value("crs_database_up") == 1
    assert workers.value("crs_cache_shard_up", shard="shard-1") == 1


def test_a_gauge_a_process_has_not_learned_is_absent_not_zero(workers: Workers) -> None:
    """A worker that has just started must not pull its node's minimum to 0; no read replica and no
    TLS must not read as a fresh replica and a certificate that expired in 1970."""
    running, starting = workers.metrics(101), workers.metrics(102)
    with workers.worker(101):
        running.topology_version.set(15)
        running.database_up.set(1)
    assert workers.value("crs_topology_version") == 15 and workers.value("crs_database_up") == 1
    assert workers.value("crs_pg_replica_staleness_seconds") is None
    assert workers.value("crs_tls_certificate_expiry_timestamp_seconds") is None
    with workers.worker(102):
        starting.pg_replica_staleness.set(0.25)
    assert workers.value("crs_pg_replica_staleness_seconds") == 0.25
    # One process alone (`crs serve` with one worker): the same, from its own registry.
    registry = CollectorRegistry()
    m = Metrics(registry)
    assert registry.get_sample_value("crs_pg_replica_staleness_seconds") is None
    assert registry.get_sample_value("crs_database_up") is None
    m.database_up.set(0)
    assert registry.get_sample_value("crs_database_up") == 0


def test_a_forgotten_shard_leaves_the_merge_once_every_worker_forgot_it(workers: Workers) -> None:
    first, second = workers.metrics(101), workers.metrics(102)
    states = ["active", "down"]
    for pid, m, up, keys in ((101, first, False, 100), (102, second, True, 7)):
        with workers.worker(pid):
            for shard in ("shard-0", "shard-1"):
                m.shard_state(shard, up)
                m.copy_state(shard, "primary", up)
                m.copy_state(shard, "replica-1", up)
                m.shard_keys.labels(shard).set(keys)
                m.shard_weight.labels(shard).set(1)
                m.shard_topology_state.labels(shard, "active").set(1)
                m.shard_error(shard)
    assert workers.value("crs_cache_shard_up", shard="shard-1") == 0
    assert workers.value("crs_cache_shard_keys", shard="shard-1") == 100
    with workers.worker(101), warnings.catch_warnings(record=True) as caught:
        first.forget_shard("shard-1", copies=["primary", "replica-1"], states=states)
    assert caught == [], "prometheus_client's 'not implemented in multi-process mode': handled, not logged"
    # The other worker still runs the old topology: its values, not the forgotten ones, and no sentinel.
    assert workers.value("crs_cache_shard_up", shard="shard-1") == 1
    assert workers.value("crs_cache_copy_up", shard="shard-1", copy="replica-1") == 1
    assert workers.value("crs_cache_shard_keys", shard="shard-1") == 7
    assert workers.value("crs_cache_shard_state", shard="shard-1", state="active") == 1
    with workers.worker(102):
        second.forget_shard("shard-1", copies=["primary", "replica-1"], states=states)
    scraped = workers.scrape()
    assert [key for key in scraped if ("shard", "shard-1") in key[1] and not key[0].endswith("_total")] == []
    assert not any(math.isinf(v) for v in scraped.values())
    assert workers.value("crs_cache_shard_errors_total", shard="shard-1") == 2, "counters stay"
    assert workers.value("crs_cache_shard_up", shard="shard-0") == 0
    assert workers.value("crs_cache_shard_keys", shard="shard-0") == 100
    # A replica removed from a shard that stays; then the shard back: its series come back.
    for pid, m in ((101, first), (102, second)):
        with workers.worker(pid):
            m.forget_copy("shard-0", "replica-1")
    assert workers.value("crs_cache_copy_up", shard="shard-0", copy="replica-1") is None
    assert workers.value("crs_cache_copy_up", shard="shard-0", copy="primary") == 0
    with workers.worker(102):
        second.shard_state("shard-1", True)
        second.shard_keys.labels("shard-1").set(3)
    assert workers.value("crs_cache_shard_up", shard="shard-1") == 1
    assert workers.value("crs_cache_shard_keys", shard="shard-1") == 3


def test_a_forgotten_shard_leaves_a_single_process_registry() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.shard_state("shard-1", True)
    m.copy_state("shard-1", "primary", True)
    m.shard_keys.labels("shard-1").set(5)
    m.shard_error("shard-1")
    m.forget_shard("shard-1", copies=["primary"], states=["active"])
    samples = [s for f in registry.collect() for s in f.samples if s.labels.get("shard") == "shard-1"]
    assert {s.name for s in samples} == {"crs_cache_shard_errors_total", "crs_cache_shard_errors_created"}
