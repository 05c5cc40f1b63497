"""Method tables for crs.v1 services, read from the proto descriptors (never string literals).

The server registers handlers with these, using an identity serializer for responses that are
already bytes (cached answers go out as they are). Clients (tests, CLI, load tests) build stubs with
`stub(channel, "LookupService")`; it works with both sync and grpc.aio channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from server.proto import crs_pb2

LOOKUP_SERVICE: ServiceDescriptor = crs_pb2.DESCRIPTOR.services_by_name["LookupService"]
ADMIN_SERVICE: ServiceDescriptor = crs_pb2.DESCRIPTOR.services_by_name["AdminService"]
FEED_SERVICE: ServiceDescriptor = crs_pb2.DESCRIPTOR.services_by_name["ChangeFeedService"]
IDENTITY_SERVICE: ServiceDescriptor = crs_pb2.DESCRIPTOR.services_by_name["IdentityService"]
SERVICES = (LOOKUP_SERVICE, ADMIN_SERVICE, FEED_SERVICE, IDENTITY_SERVICE)

# The node's own bound on what it sends (a Snapshot chunk is a few hundred rows; answers are
# ANSWER_MAX_BYTES at most).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# An answer, as the node sends it: what a gRPC client accepts by default (grpc.max_receive_message_length,
# 4 MiB in every gRPC library), so that no caller must be configured to read one. A bigger message
# reached the caller as RESOURCE_EXHAUSTED "CLIENT: Received message larger than max" from its own
# library, which says nothing of why. A customer profile over it is refused FAILED_PRECONDITION
# (server/store/reads.py); a BatchResolve's answers over it are answered a key at a time
# (server/encoding.py).
ANSWER_MAX_BYTES = 4 * 1024 * 1024
# A request, as the node accepts it: gRPC reads the whole message into memory before any handler, the
# gate (authentication, rate limits) included, so whoever can open a connection could make the node
# hold this much per call (16 MiB each before, 256 calls a connection). The largest request there is,
# a BatchResolve of CRS_BATCH_MAX (1,000) keys with 128-character correlation ids, is ~170 KiB; a
# larger one is refused RESOURCE_EXHAUSTED by gRPC.
MAX_REQUEST_BYTES = 1024 * 1024
# Clients may send keepalive pings this often without a call or data in between (gRPC's default is
# 5 minutes, and a client that pings more often is cut off with GOAWAY "too_many_pings"); the client
# configuration we recommend pings every 20 s (server/client_config.py).
MIN_CLIENT_PING_INTERVAL_MS = 10_000


def keepalive_options(every: float, timeout: float) -> tuple[tuple[str, int], ...]:
    """gRPC channel arguments for HTTP/2 keepalive pings, server or client: a ping after `every`
    seconds, the connection closed when one goes unanswered for `timeout` seconds. A peer that is gone
    without closing the connection (its host lost, a partition) is noticed this way; TCP alone waits
    out its retransmissions (~15 minutes on Linux) or, on a quiet connection, for ever.
    grpcio 1.85 times the answer with grpc.http2.ping_timeout_ms (default 1 minute), not with
    grpc.keepalive_timeout_ms alone (measured: docs/decisions.md "Keepalive"), so both are set; and
    gRPC's keepalive guide says a sender stops pinging after two pings with no data in between (an
    idle connection) unless max_pings_without_data is 0."""
    return (("grpc.keepalive_time_ms", int(every * 1000)), ("grpc.keepalive_timeout_ms", int(timeout * 1000)),
            ("grpc.http2.ping_timeout_ms", int(timeout * 1000)), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0))


# Calls (HTTP/2 streams) one client connection may have open at once, unary calls included. gRPC's
# default is unlimited, and each open stream may hold its flow-control windows' worth of buffers
# (~64 KiB each way without BDP probing): 256 bound one connection to ~32 MiB. 256, the most the audit
# allowed, because a call past it is refused, not queued (grpcio 1.85: RST_STREAM REFUSED_STREAM, the
# client sees UNAVAILABLE, which the recommended client configuration retries): it is 4x a hybrid
# process's 64 serving threads and 16x what one bench connection carries (16 calls over 4 channels,
# 8 streams). It is below a client's default share of a process's open streams (CRS_STREAMS_PER_CLIENT,
# 3/4 of 512 = 384), which counts all of the client's connections: a client that holds more than 256
# streams on one node process needs a second channel (docs/decisions.md "HTTP/2 windows and calls per
# connection").
MAX_STREAMS_PER_CONNECTION = 256

# The node's server options, whichever serving model (server/app.py adds keepalive_options and the
# connection age); the benchmark's echo servers use them too, so both sides of its comparison are
# configured alike. No HTTP/2 BDP probing on the node's side: it grows the windows of a connection
# with traffic to several MB a stream, and a client that then stops reading left that much buffered
# in the node per stream, for as long as the stream lived (an outside audit: 40 unread StreamResolves
# took a node from 122 to 275 MB; a bare server without the probe, 36 to 41 MB). The node's own
# receive window only paces what clients send it (keys, small); what it sends is paced by the
# client's window, which the client's own BDP probe still grows (a Snapshot's throughput is unchanged:
# docs/decisions.md "HTTP/2 windows and calls per connection").
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 1),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
)


@dataclass(frozen=True)
class Method:
    service: str            # "crs.v1.LookupService"
    name: str               # "ResolveCard"
    path: str               # "/crs.v1.LookupService/ResolveCard"
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


def _method(service: ServiceDescriptor, md: MethodDescriptor) -> Method:
    return Method(service=service.full_name, name=md.name, path=f"/{service.full_name}/{md.name}",
                  request=GetMessageClass(md.input_type), response=GetMessageClass(md.output_type),
                  client_streaming=md.client_streaming, server_streaming=md.server_streaming)


def methods(service: ServiceDescriptor) -> dict[str, Method]:
    return {md.name: _method(service, md) for md in service.methods}


class Stub:
    """Callables per method, e.g. `stub.ResolveCard(request, timeout=1)`."""

    def __init__(self, channel: Any, service: ServiceDescriptor) -> None:
        for m in methods(service).values():
            if m.client_streaming and m.server_streaming:
                factory = channel.stream_stream
            elif m.server_streaming:
                factory = channel.unary_stream
            elif m.client_streaming:
                factory = channel.stream_unary
            else:
                factory = channel.unary_unary
            setattr(self, m.name, factory(m.path, request_serializer=m.request.SerializeToString,
                                          response_deserializer=m.response.FromString))

    def __getattr__(self, name: str) -> Any:  # for type checkers: methods are set in __init__
        raise AttributeError(name)


def stub(channel: Any, service: str) -> Stub:
    return Stub(channel, crs_pb2.DESCRIPTOR.services_by_name[service])
