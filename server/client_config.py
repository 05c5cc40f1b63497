"""The client configuration we recommend to every caller (docs/deploy.md, "Clients"): a gRPC service
config with round-robin balancing over every node address, client-side health checking (a draining
node, NOT_SERVING, gets no new calls) and a retry policy for UNAVAILABLE, and keepalive pings (a node
gone without closing its connections is left within ~30 s). With it a rolling restart of every node
under load fails no call (tests/integration/test_rollout.py). `crs lookup` and the
locust user use it; switches in other languages paste SERVICE_CONFIG_JSON into their channel setup.

Writes are retried too: a retried AdminService or IdentityService write is safe only because it
carries a `request_id` (the server answers a retry with the first answer), so always send one.
"""

from __future__ import annotations

import json
from typing import Any

from server.rpc import keepalive_options

RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 3,
    "initialBackoff": "0.01s",
    "maxBackoff": "0.1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [{
        "name": [{"service": "crs.v1.LookupService"}, {"service": "crs.v1.IdentityService"},
                 {"service": "crs.v1.AdminService"}, {"service": "crs.v1.ChangeFeedService"}],
        "retryPolicy": RETRY_POLICY,
    }],
    # Retries stop when more than half the recent calls failed: a real outage is not multiplied by 3.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}
SERVICE_CONFIG_JSON = json.dumps(SERVICE_CONFIG, separators=(",", ":"))

# Keepalive: a node that vanished without closing the connection (its host lost, a partition) is
# noticed within 30 s and its calls go to the other nodes; without it the connection waits on TCP's
# retransmissions, ~15 minutes on Linux, and every call balanced to it fails by its deadline. The
# nodes accept a ping every 10 s or less often (server/rpc.py MIN_CLIENT_PING_INTERVAL_MS).
KEEPALIVE_SECONDS = 20.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", SERVICE_CONFIG_JSON),
    ("grpc.enable_retries", 1),
    *keepalive_options(KEEPALIVE_SECONDS, KEEPALIVE_TIMEOUT_SECONDS),
)


def multi_target(addresses: list[str]) -> str:
    """A channel target naming several nodes ("ipv4:10.0.0.1:50051,10.0.0.2:50051"); in Kubernetes
    use the headless Service instead: "dns:///crs-node-headless.crs.svc:50051"."""
    return "ipv4:" + ",".join(addresses)
