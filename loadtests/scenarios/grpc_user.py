"""A locust User for gRPC, after locust's documented pattern (docs: "Testing other systems";
examples/grpc): the synchronous grpc client made gevent-cooperative with
`grpc.experimental.gevent.init_gevent()`, and a client interceptor that reports every call to
locust's `events.request` hook with its name, response time, response length and, for a failure,
an exception that carries the gRPC status code, so failures by status show in the UI, the CSV
files and the HTML report.

Expected error statuses. A load test sends some unknown and malformed keys on purpose
(loadtests/shared/keys.py); the service answering them NOT_FOUND / INVALID_ARGUMENT is correct
behaviour, not a failure. A call says what it expects (`expect="NOT_FOUND"`); the interceptor then
reports the expected status as a *success* under its own name, e.g. `ResolveCard pan [NOT_FOUND]`,
so those calls appear as separate rows (count, latency) and never in the failure table. Any other
outcome, an OK where an error was expected included, is a failure whose exception reads
`GrpcStatus(UNAVAILABLE, expected OK): details`.

TLS hook. `channel_for(target, tls)` is the only place a channel is made: with a `TlsOptions`
(CA bundle, and a client certificate + key for mutual TLS) it opens a secure channel. The
locustfile exposes these as --crs-tls-* flags (a production node: the bank's CA and a load-test
client certificate whose clients-file entry grants the lookup scopes), and --crs-embedded-tls fills
them from the embedded stack's dev PKI. Bearer tokens (JWT) would be one more metadata entry in
`GrpcUser.call`; no flag sets one yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.exception import LocustError

from server import rpc
from server.client_config import channel_options

grpc_gevent.init_gevent()   # before any channel exists: grpc's I/O then yields to other greenlets

# One TCP connection per channel: grpc otherwise shares a subchannel between channels with the same
# target and options, so every simulated user of a process would ride ONE connection, and a node
# with several worker processes (SO_REUSEPORT spreads connections, not calls) would see all the
# load on one worker.
# The retry policy and balancing we recommend to every caller (server/client_config.py).
LOCAL_SUBCHANNELS: tuple[str, Any] = ("grpc.use_local_subchannel_pool", 1)

LABEL_KEY = "x-locust-name"      # request metadata the interceptor reads and strips (never sent)
EXPECT_KEY = "x-locust-expect"


class GrpcStatus(Exception):
    """A call that ended with a status other than the one expected."""

    def __init__(self, code: str, details: str, expected: str = "OK") -> None:
        super().__init__(code, details, expected)
        self.code, self.details, self.expected = code, details, expected

    def __repr__(self) -> str:   # locust groups failures by repr()
        exp = "" if self.expected == "OK" else f", expected {self.expected}"
        return f"GrpcStatus({self.code}{exp}): {self.details[:120]}"

    __str__ = __repr__


@dataclass(frozen=True)
class TlsOptions:
    """Where the client's TLS material is. ca alone = server-authenticated TLS; cert+key = mutual."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None     # override the name checked in the server certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            return p.read_bytes() if p is not None else None

        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: give both the client certificate and its key, or neither")
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca), private_key=read(self.key),
                                            certificate_chain=read(self.cert))


def split_host(host: str) -> tuple[str, bool]:
    """'grpc://h:p' or 'h:p' -> ('h:p', False); 'grpcs://h:p' -> ('h:p', True)."""
    for scheme, secure in (("grpcs://", True), ("grpc://", False), ("https://", True), ("http://", False)):
        if host.startswith(scheme):
            return host[len(scheme):].rstrip("/"), secure
    return host.rstrip("/"), False


def channel_for(target: str, tls: TlsOptions | None = None,
                options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
    """THE place channels are made (the TLS hook); by default with the recommended configuration for
    the target (server/client_config.py) on a connection of its own."""
    if options is None:
        options = (LOCAL_SUBCHANNELS, *channel_options(target))
    if tls is not None:
        opts = list(options)
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.secure_channel(target, tls.credentials(), options=opts)
    return grpc.insecure_channel(target, options=list(options))


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: Sequence[tuple[str, str]] | None) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def _take_labels(details: grpc.ClientCallDetails) -> tuple[grpc.ClientCallDetails, str, str]:
    """(details without our labels, report name, expected status)."""
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    name, expect = method.rsplit("/", 1)[-1], "OK"
    if not details.metadata:
        return details, name, expect
    kept = []
    for k, v in details.metadata:
        if k == LABEL_KEY:
            name = str(v)
        elif k == EXPECT_KEY:
            expect = str(v)
        else:
            kept.append((k, v))
    return _CallDetails(details, kept or None), name, expect


def report_name(name: str, expect: str) -> str:
    return name if expect == "OK" else f"{name} [{expect}]"


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):   # type: ignore[misc]
    """Fires locust's request event for every unary call (see the module docstring)."""

    def __init__(self, environment: Any) -> None:
        self.env = environment

    def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        details, name, expect = _take_labels(client_call_details)
        start = time.perf_counter()
        call = continuation(details, request)
        code = call.code()                     # waits for the call to finish
        elapsed_ms = (time.perf_counter() - start) * 1000
        length = 0
        exception: Exception | None = None
        if code == grpc.StatusCode.OK:
            length = call.result().ByteSize()
        if code.name != expect:
            exception = GrpcStatus(code.name, call.details() or "", expect)
        self.env.events.request.fire(
            request_type="grpc", name=report_name(name, expect), response_time=elapsed_ms,
            response_length=length, response=call if code == grpc.StatusCode.OK else None,
            context={"lookups": len(getattr(request, "keys", ())) or 1, "code": code.name, "expect": expect},
            exception=exception)
        return call


def labels(name: str, expect: str = "OK") -> list[tuple[str, str]]:
    """Metadata for one call: how locust names it and which status it expects."""
    return [(LABEL_KEY, name), (EXPECT_KEY, expect)]


class GrpcUser(User):  # type: ignore[misc]
    """Abstract: a user with its own channel (own TCP connection) and a LookupService stub.

    Subclasses call e.g. `self.call("ResolveCard", request, name="ResolveCard pan", expect="OK")`.
    A call whose status differs from `expect` raises nothing here (the interceptor has reported it);
    `call` returns the response message or None.
    """

    abstract = True
    tls: TlsOptions | None = None
    timeout: float = 5.0

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError("set the target with --host 127.0.0.1:50051 (or grpcs://host:port for TLS)")
        target, secure = split_host(self.host)
        tls = self.tls if self.tls is not None else (TlsOptions() if secure else None)
        self._raw_channel = channel_for(target, tls)
        self.channel = grpc.intercept_channel(self._raw_channel, LocustInterceptor(environment))
        self.stub = rpc.stub(self.channel, "LookupService")
        self.raw_stub = rpc.stub(self._raw_channel, "LookupService")   # streams: reported by the caller

    def call(self, method: str, request: Any, *, name: str | None = None, expect: str = "OK") -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout, metadata=labels(name or method, expect))
        except grpc.RpcError:
            return None   # already reported by the interceptor, as a success or a failure

    def on_stop(self) -> None:
        self._raw_channel.close()
