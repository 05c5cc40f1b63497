"""What every RPC runs around its handler, whichever serving model answers it (grpc.aio or hybrid):
the request parser and the gate (who calls, may they, are they over their rate).

Both models register the same method table (server/rpc.py) with no (de)serializers: requests are
parsed here so a corrupt message maps to INVALID_ARGUMENT (grpc would answer UNKNOWN), and responses
are already serialized bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server import rpc
from server.auth import Authenticator
from server.caller import ADMIN_WRITE, FEED_READ, IDENTITY_RPC_SCOPE, LOOKUP_RPC_SCOPE, Caller
from server.errors import CrsError, InvalidKey, status_details_trailer, status_for
from server.logs import LIMIT_KEY
from server.metrics import Metrics

log = logging.getLogger("crs.node")


def failed_call(exc: Exception, name: str, metrics: Metrics,
                started: float) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """How a call that raised `exc` ends, in either serving model: the status errors.status_for maps
    it to (the only place codes are chosen), its message and trailing details; the call is counted,
    and an error that is not ours is logged (a bug that fails every call: a line per RPC and error
    class per CRS_LOG_REPEAT_INTERVAL, the first with its traceback at once)."""
    code, message = status_for(exc)
    if not isinstance(exc, CrsError):
        log.exception("unhandled error", extra={"rpc": name, LIMIT_KEY: (name, type(exc).__name__)})
    metrics.observe_rpc(name, code.name, time.perf_counter() - started)
    return code, message, status_details_trailer(exc)


def request_parser(method: rpc.Method) -> Callable[[bytes], Any]:
    from_string = method.request.FromString
    what = method.request.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return from_string(raw)
        except DecodeError as exc:
            raise InvalidKey(f"request is not a valid {what} message") from exc

    return parse


# RPCs whose handler charges the rate limit one per key (LookupHandlers.charge): a batch of 1,000 keys
# costs 1,000, not one more. (A StreamResolve pays one to open, then one per key.)
CHARGED_BY_HANDLER = frozenset({(rpc.LOOKUP_SERVICE.full_name, "BatchResolve")})


class Gate:
    """Runs before any handler work: who is calling (UNAUTHENTICATED), may they call this RPC
    (PERMISSION_DENIED), and is their token bucket empty (RESOURCE_EXHAUSTED)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def scopes_for(self, method: rpc.Method) -> frozenset[str]:
        if method.service == rpc.LOOKUP_SERVICE.full_name:
            return LOOKUP_RPC_SCOPE[method.name]
        if method.service == rpc.FEED_SERVICE.full_name:
            return frozenset({FEED_READ})
        if method.service == rpc.IDENTITY_SERVICE.full_name:
            return IDENTITY_RPC_SCOPE[method.name]
        return frozenset({ADMIN_WRITE})

    @staticmethod
    def entry_cost(method: rpc.Method) -> int:
        """What a call costs the caller's token bucket on entry, decided once when handlers are built:
        one, but nothing for an RPC whose handler charges one per key itself (CHARGED_BY_HANDLER)."""
        return 0 if (method.service, method.name) in CHARGED_BY_HANDLER else 1

    def admit(self, context: grpc.ServicerContext | grpc.aio.ServicerContext, scopes: frozenset[str],
              name: str, cost: int) -> Caller:
        caller = self.authenticator.authenticate(context)
        caller.require_any(scopes, name)
        self.authenticator.admit(caller, cost)
        return caller
