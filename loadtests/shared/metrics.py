"""The node's lookup counters by tier, read from its Prometheus /metrics page.

Both the benchmark's load generator and the sweep take a reading at each edge of the measured window;
the difference shows which tier (near-cache, Redis, PostgreSQL, ...) answered the lookups. The
benchmark's h2load client, which sees HTTP statuses only, reads the calls that did not end OK here too.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

LOOKUPS = "crs_lookups_total"   # server/metrics.py: keys answered, label `tier`
CALLS = "crs_rpc_latency_seconds_count"   # server/metrics.py: RPCs ended, labels `method` and `code`


def page(url: str, timeout: float) -> str:
    """One node's /metrics page (raises OSError when it cannot be fetched)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text: str = resp.read().decode()
    return text


def tiers_in(text: str) -> dict[str, float]:
    """crs_lookups_total by tier in one page of Prometheus text exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == LOOKUPS and "tier" in sample.labels:
                tier = sample.labels["tier"]
                out[tier] = out.get(tier, 0.0) + sample.value
    return out


def failed_calls_in(text: str) -> float:
    """RPCs that ended with a status other than OK, every method, in one page of Prometheus text."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == CALLS and sample.labels.get("code") != "OK")


def scrape_tiers(urls: Iterable[str], timeout: float = 3.0) -> dict[str, float]:
    """crs_lookups_total by tier, summed over the nodes' /metrics pages; a page that cannot be fetched
    counts as none (a node without metrics, or one that is gone)."""
    out: dict[str, float] = {}
    for url in urls:
        try:
            text = page(url, timeout)
        except OSError:
            continue
        for tier, value in tiers_in(text).items():
            out[tier] = out.get(tier, 0.0) + value
    return out
