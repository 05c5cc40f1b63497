"""The resharding settings: defaults, and every bad value named."""

from __future__ import annotations

import pytest

from server.settings import SettingsError, load_settings
from server.topology.policy import MigrationPolicy


def test_defaults_and_the_policy_derived_from_them() -> None:
    s = load_settings({})
    assert (s.topology_file, s.topology_poll_interval, s.topology_lease) == ("", 1.0, 10.0)
    assert (s.shard_stats_interval, s.migration_rate, s.migration_batch) == (10.0, 20_000, 500)
    policy = MigrationPolicy.from_settings(s)
    assert policy.copy_budget == s.reinvalidate_delay / 2 and policy.lease == s.topology_lease
    assert policy.wait_timeout == 60.0 and policy.rate == 20_000
    assert MigrationPolicy.from_settings(s, rate=10, batch=5, wait_timeout=1).batch == 5


def test_bad_values_are_named() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"CRS_TOPOLOGY_POLL_INTERVAL": "0", "CRS_MIGRATION_RATE": "-1", "CRS_MIGRATION_BATCH": "0",
                       "CRS_SHARD_STATS_INTERVAL": "-1"})
    text = str(info.value)
    for name in ("CRS_TOPOLOGY_POLL_INTERVAL", "CRS_MIGRATION_RATE", "CRS_MIGRATION_BATCH",
                 "CRS_SHARD_STATS_INTERVAL"):
        assert name in text
    with pytest.raises(SettingsError, match="CRS_TOPOLOGY_LEASE must be >= 3 x"):
        load_settings({"CRS_TOPOLOGY_POLL_INTERVAL": "2", "CRS_TOPOLOGY_LEASE": "5"})
