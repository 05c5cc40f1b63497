"""Keepalive: connections whose peer vanished without closing them (a host lost, a partition) are
noticed and closed by HTTP/2 pings on the node's side (CRS_KEEPALIVE_TIME, CRS_KEEPALIVE_TIMEOUT); the
vanishing is a FreezingProxy (what either side sends vanishes, nothing is closed). The recommended
client options (server/client_config.py) are checked against what the node accepts; their own
behaviour (a frozen connection left in ~10 s, an idle minute without GOAWAY) was measured by hand,
since at their 20 s period it would take a minute of the suite (docs/decisions.md "Keepalive")."""

from __future__ import annotations

import time

from devstack.environment import DevEnvironment, open_channel
from server import rpc
from server.client_config import CHANNEL_OPTIONS
from server.proto import crs_pb2 as pb
from tests.integration.support import FreezingProxy, metric, wait_metric


def test_a_client_gone_without_closing_is_dropped_with_its_stream(dev_env: DevEnvironment) -> None:
    """A Watch open through a connection that then goes silent: the node's ping goes unanswered and
    the node closes the connection and ends the stream (its thread, its feed subscription) within
    keepalive time + timeout. gRPC's default would wait two hours for its first ping."""
    node = dev_env.start_node(workers=1, keepalive_time=1.0, keepalive_timeout=1.0)
    try:
        with FreezingProxy(node.settings.grpc_port) as proxy:
            channel = open_channel(f"127.0.0.1:{proxy.port}", node.pki, "feed")
            call = rpc.stub(channel, "ChangeFeedService").Watch(
                pb.WatchRequest(entity_types=[pb.ENTITY_TYPE_CUSTOMER]))
            wait_metric(node, "crs_feed_watchers", 1.0, within=20)
            time.sleep(2.5)                # pings answered meanwhile: the live stream stays
            assert metric(node, "crs_feed_watchers") == 1.0
            proxy.freeze()
            took = wait_metric(node, "crs_feed_watchers", 0.0, within=15)
            assert took < 6, took          # 1 s to the next ping + 1 s unanswered, with slack
            call.cancel()
            channel.close()
    finally:
        node.stop()


def test_the_recommended_client_pings_no_more_often_than_a_node_allows() -> None:
    """A client that pings more often than the node accepts is cut off (GOAWAY too_many_pings) on every
    connection; the recommended one pings every 20 s, answered within 10 s, and the node accepts every
    10 s. (Checked by hand for a minute against a node: docs/decisions.md "Keepalive".)"""
    client, server = dict(CHANNEL_OPTIONS), dict(rpc.SERVER_OPTIONS)
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    timeout = client["grpc.keepalive_timeout_ms"]
    assert client["grpc.http2.ping_timeout_ms"] == timeout < client["grpc.keepalive_time_ms"]
    assert client["grpc.http2.max_pings_without_data"] == 0
