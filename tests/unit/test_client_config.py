"""The recommended client configuration (server/client_config.py): which one a target gets."""

from __future__ import annotations

import json

import pytest

from server.client_config import CHANNEL_OPTIONS, SINGLE_ADDRESS_CHANNEL_OPTIONS, channel_options, names_several_nodes


@pytest.mark.parametrize(("target", "several"), [
    ("127.0.0.1:50051", False), ("localhost:50051", False), ("crs.bank.example:443", False),
    ("ipv4:10.0.0.1:50051", False), ("ipv4:10.0.0.1:50051,10.0.0.2:50051", True),
    ("ipv6:[::1]:50051,[::2]:50051", True), ("dns:///crs-node-headless.crs.svc.cluster.local:50051", True),
])
def test_health_checking_only_where_the_channel_can_move_away(target: str, several: bool) -> None:
    assert names_several_nodes(target) is several
    options = dict(channel_options(target))
    config = json.loads(options["grpc.service_config"])
    assert ("healthCheckConfig" in config) is several
    # Everything else is the same: retries (also of a node's CANCELLED at shutdown), keepalive.
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert {k: v for k, v in options.items() if k != "grpc.service_config"} == {
        k: v for k, v in dict(CHANNEL_OPTIONS).items() if k != "grpc.service_config"}
    assert options == dict(CHANNEL_OPTIONS if several else SINGLE_ADDRESS_CHANNEL_OPTIONS)
    # Behind one address calls wait for the channel to reconnect (within their deadline), except for a
    # one-shot command; with several addresses round robin moves them and they fail fast.
    assert config["methodConfig"][0].get("waitForReady", False) is not several
    one_shot = json.loads(dict(channel_options(target, wait_for_ready=False))["grpc.service_config"])
    assert "waitForReady" not in one_shot["methodConfig"][0]
    assert ("healthCheckConfig" in one_shot) is several
    # A failed connection attempt is tried again within 100 ms, and never more than 2 s apart.
    assert options["grpc.initial_reconnect_backoff_ms"] == 100 and options["grpc.max_reconnect_backoff_ms"] == 2000
