"""Per-call counts reach the Prometheus histogram and counter exactly at flush()."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from server.metrics import Metrics


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
