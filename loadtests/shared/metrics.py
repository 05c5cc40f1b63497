"""The node's lookup counters by tier, read from its Prometheus /metrics page.

Both the benchmark's load generator and the sweep take a reading at each edge of the measured window;
the difference shows which tier (near-cache, Redis, PostgreSQL, ...) answered the lookups.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

LOOKUPS = "crs_lookups_total"   # server/metrics.py: keys answered, label `tier`


def tiers_in(text: str) -> dict[str, float]:
    """crs_lookups_total by tier in one page of Prometheus text exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == LOOKUPS and "tier" in sample.labels:
                tier = sample.labels["tier"]
                out[tier] = out.get(tier, 0.0) + sample.value
    return out


def scrape_tiers(urls: Iterable[str], timeout: float = 3.0) -> dict[str, float]:
    """crs_lookups_total by tier, summed over the nodes' /metrics pages; a page that cannot be fetched
    counts as none (a node without metrics, or one that is gone)."""
    out: dict[str, float] = {}
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for tier, value in tiers_in(text).items():
            out[tier] = out.get(tier, 0.0) + value
    return out
