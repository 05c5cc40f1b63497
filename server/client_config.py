"""The client configuration we recommend to every caller (docs/deploy.md, "Clients"): a gRPC service
config with round-robin balancing over every node address, client-side health checking (a draining
node, NOT_SERVING, gets no new calls) and a retry policy for UNAVAILABLE, and keepalive pings (a node
gone without closing its connections is left within ~30 s). With it a rolling restart of every node
under load fails no call (tests/integration/test_rollout.py). `crs lookup` and the
locust user use it; switches in other languages paste SERVICE_CONFIG_JSON into their channel setup.

That is for a client that sees every node's address (the headless Service, a list). Behind ONE
address that stands for several nodes (an L4 load balancer's VIP, a ClusterIP Service, a
port-forward, one node's workers sharing a port) health checking does harm: a draining node turns
NOT_SERVING while it still answers, and a channel with no other address to move to fails every call
fast until the node closes the connection (an outside check: 302 of 3,600 calls in the 1 s drain
delay). SINGLE_ADDRESS_SERVICE_CONFIG leaves it out: calls go on over the draining connection, and
its GOAWAY moves the channel to a new one, which the balancer gives to a node that serves.
`channel_options(target)` picks one of the two for a gRPC target.

Behind one address the channel also WAITS FOR READY (within each call's deadline). Its one
connection can be reset as it reconnects: a draining worker's listener (workers share a port,
SO_REUSEPORT) closes with the new connection still in its queue or mid-handshake. gRPC then waits its
reconnect backoff (1 s by default) before the next attempt, and fail-fast calls all failed meanwhile
(10,944 in one test run; retries do not help, they are spent in milliseconds and then throttled).
With waitForReady they wait for the next attempt, which starts after 100 ms
(RECONNECT_BACKOFF_OPTIONS). The price: when that address is really down, a call fails at its
deadline (DEADLINE_EXCEEDED) rather than at once; a client with several addresses fails fast, as
round robin moves its calls to the nodes still up. A one-shot command (the `crs` CLI) asks
`channel_options(target, wait_for_ready=False)` and says "unreachable" at once.

Writes are retried too: a retried AdminService or IdentityService write is safe only because it
carries a `request_id` (the server answers a retry with the first answer), so always send one.
Retried: UNAVAILABLE, and CANCELLED, which a node answers a call that reached it as it stopped
listening (drain); a call the client cancels itself is never retried.
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
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
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
ONE_SHOT_SERVICE_CONFIG: dict[str, Any] = {k: v for k, v in SERVICE_CONFIG.items() if k != "healthCheckConfig"}
SINGLE_ADDRESS_SERVICE_CONFIG: dict[str, Any] = {
    **ONE_SHOT_SERVICE_CONFIG, "methodConfig": [{**SERVICE_CONFIG["methodConfig"][0], "waitForReady": True}]}
SINGLE_ADDRESS_SERVICE_CONFIG_JSON = json.dumps(SINGLE_ADDRESS_SERVICE_CONFIG, separators=(",", ":"))

# Keepalive: a node that vanished without closing the connection (its host lost, a partition) is
# noticed within 30 s and its calls go to the other nodes; without it the connection waits on TCP's
# retransmissions, ~15 minutes on Linux, and every call balanced to it fails by its deadline. The
# nodes accept a ping every 10 s or less often (server/rpc.py MIN_CLIENT_PING_INTERVAL_MS).
KEEPALIVE_SECONDS = 20.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0
# Reconnecting: a failed connection attempt is tried again after 100 ms (gRPC: 1 s), then 160 ms,
# 256 ms, ... at most every 2 s (gRPC: 2 minutes), so a channel is back within ~2 s of its server.
RECONNECT_BACKOFF_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", SERVICE_CONFIG_JSON),
    ("grpc.enable_retries", 1),
    *RECONNECT_BACKOFF_OPTIONS,
    *keepalive_options(KEEPALIVE_SECONDS, KEEPALIVE_TIMEOUT_SECONDS),
)
SINGLE_ADDRESS_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", SINGLE_ADDRESS_SERVICE_CONFIG_JSON), *CHANNEL_OPTIONS[1:])
ONE_SHOT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", json.dumps(ONE_SHOT_SERVICE_CONFIG, separators=(",", ":"))), *CHANNEL_OPTIONS[1:])


def names_several_nodes(target: str) -> bool:
    """Whether a gRPC target lets the client see each node: an `ipv4:`/`ipv6:` list of more than one
    address, or a `dns:` name (the headless Service, one record per pod; a DNS name for a load
    balancer's VIP should be given without the scheme, as host:port). A bare host:port is one address."""
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return "," in rest
    return scheme == "dns"


def channel_options(target: str, *, wait_for_ready: bool = True) -> tuple[tuple[str, Any], ...]:
    """The recommended options for `target`: health checking only where the channel can move away,
    waiting for ready where it cannot; `wait_for_ready=False` for a one-shot command."""
    if names_several_nodes(target):
        return CHANNEL_OPTIONS
    return SINGLE_ADDRESS_CHANNEL_OPTIONS if wait_for_ready else ONE_SHOT_CHANNEL_OPTIONS


def multi_target(addresses: list[str]) -> str:
    """A channel target naming several nodes ("ipv4:10.0.0.1:50051,10.0.0.2:50051"); in Kubernetes
    use the headless Service instead: "dns:///crs-node-headless.crs.svc:50051"."""
    return "ipv4:" + ",".join(addresses)
