"""Server reflection for callers this service knows (docs/security.md, "Reflection and health").

Reflection lists every service and sends the descriptors of every message: a map of the API, not
data, but nothing a stranger needs. A call is admitted as any crs.v1 call is (a registered client
certificate, a bearer token naming a known client, or anonymous where CRS_ALLOW_ANONYMOUS is on); no
scope is needed, so `grpcurl` works for every client. Each request on the stream costs the caller one
token of its rate limit (the clients file's `rate_per_s`, as a lookup does): a registered client
looping on reflection requests was not limited at all (tenth audit, DoS 5). Health is left open on
purpose: Kubernetes probes and client-side health checking carry no credentials (docs/security.md).

grpc_reflection's servicers are used as they are, wrapped; `enable_server_reflection` would register
them with no check at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server.auth import Authenticator
from server.caller import Caller
from server.errors import CrsError, status_for
from server.logs import LIMIT_KEY

log = logging.getLogger("crs.node")

SERVICE_NAME: str = reflection.SERVICE_NAME
# grpc.reflection.v1 is v1alpha under its final name, message for message (the same fields and numbers):
# one servicer answers both. grpcio-reflection ships only v1alpha; grpcurl and other current clients
# ask v1 first.
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (SERVICE_NAME, V1_SERVICE_NAME)


class Reflection(reflection.ReflectionServicer):  # type: ignore[misc]
    """The synchronous server's (hybrid model) reflection: the caller is checked before the first answer.
    With `slot`, an admitted stream then holds one of the node's stream slots while open
    (server/stream_stall.py, StreamSlots): refused UNAVAILABLE when there is none, as any stream."""

    def __init__(self, service_names: Iterable[str], authenticator: Authenticator,
                 slot: Callable[[Caller], AbstractContextManager[None]] | None = None) -> None:
        super().__init__(tuple(service_names))
        self.authenticator = authenticator
        self.slot = slot or (lambda caller: contextlib.nullcontext())

    def ServerReflectionInfo(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        with contextlib.ExitStack() as held:
            try:
                caller = self.authenticator.authenticate(context)
                held.enter_context(self.slot(caller))
                yield from super().ServerReflectionInfo(self._charged(request_iterator, caller), context)
            except Exception as exc:   # a CrsError's status; anything else INTERNAL, never its text
                _unexpected(exc)
                context.abort(*status_for(exc))

    def _charged(self, requests: Iterator[Any], caller: Caller) -> Iterator[Any]:
        for request in requests:
            self.authenticator.admit(caller)
            yield request


class AsyncReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """The grpc.aio server's reflection, with the same check and, with `slot`, the same stream slot."""

    def __init__(self, service_names: Iterable[str], authenticator: Authenticator,
                 slot: Callable[[Caller], AbstractContextManager[None]] | None = None) -> None:
        super().__init__(tuple(service_names))
        self.authenticator = authenticator
        self.slot = slot or (lambda caller: contextlib.nullcontext())

    async def ServerReflectionInfo(self, request_iterator: AsyncIterator[Any],
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with contextlib.ExitStack() as held:
            try:
                caller = self.authenticator.authenticate(context)
                held.enter_context(self.slot(caller))
                async for answer in super().ServerReflectionInfo(self._charged(request_iterator, caller), context):
                    yield answer
            except Exception as exc:
                _unexpected(exc)
                await context.abort(*status_for(exc))

    async def _charged(self, requests: AsyncIterator[Any], caller: Caller) -> AsyncIterator[Any]:
        async for request in requests:
            self.authenticator.admit(caller)
            yield request


def _unexpected(exc: Exception) -> None:
    if not isinstance(exc, CrsError):
        log.exception("unhandled error", extra={"rpc": "ServerReflectionInfo", LIMIT_KEY: (type(exc).__name__,)})


def add_reflection(server: grpc.Server | grpc.aio.Server, service_names: Iterable[str],
                   authenticator: Authenticator, *, stream_pool: Executor | None = None,
                   slot: Callable[[Caller], AbstractContextManager[None]] | None = None) -> None:
    """`slot`: a reflection stream holds one of the node's stream slots while open, as its own streams
    do (either server); `stream_pool` (the synchronous server): it runs on their pool, never on the
    unary calls' threads: a client library that keeps a reflection stream open per channel would
    otherwise hold one each."""
    info: Callable[..., Any]
    if isinstance(server, grpc.aio.Server):
        info = AsyncReflection(service_names, authenticator, slot).ServerReflectionInfo
    else:
        servicer = Reflection(service_names, authenticator, slot)

        def info(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            return servicer.ServerReflectionInfo(request_iterator, context)

        if stream_pool is not None:
            info.experimental_thread_pool = stream_pool   # type: ignore[attr-defined]
    handler = grpc.stream_stream_rpc_method_handler(
        info, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(tuple(grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
                                          for name in SERVICE_NAMES))
