"""Server reflection for callers this service knows (docs/security.md, "Reflection and health").

Reflection lists every service and sends the descriptors of every message: a map of the API, not
data, but nothing a stranger needs. A call is admitted as any crs.v1 call is (a registered client
certificate, a bearer token naming a known client, or anonymous where CRS_ALLOW_ANONYMOUS is on); no
scope is needed, so `grpcurl` works for every client. Health is left open on purpose: Kubernetes
probes and client-side health checking carry no credentials.

grpc_reflection's servicers are used as they are, wrapped; `enable_server_reflection` would register
them with no check at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from server.auth import Authenticator
from server.errors import CrsError, status_for

SERVICE_NAME: str = reflection.SERVICE_NAME


class Reflection(reflection.ReflectionServicer):  # type: ignore[misc]
    """The synchronous server's (hybrid model) reflection: the caller is checked before the first answer."""

    def __init__(self, service_names: Iterable[str], authenticator: Authenticator) -> None:
        super().__init__(tuple(service_names))
        self.authenticator = authenticator

    def ServerReflectionInfo(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            self.authenticator.authenticate(context)
        except CrsError as exc:
            context.abort(*status_for(exc))
        yield from super().ServerReflectionInfo(request_iterator, context)


class AsyncReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """The grpc.aio server's reflection, with the same check."""

    def __init__(self, service_names: Iterable[str], authenticator: Authenticator) -> None:
        super().__init__(tuple(service_names))
        self.authenticator = authenticator

    async def ServerReflectionInfo(self, request_iterator: AsyncIterator[Any],
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            self.authenticator.authenticate(context)
        except CrsError as exc:
            await context.abort(*status_for(exc))
        async for answer in super().ServerReflectionInfo(request_iterator, context):
            yield answer


def add_reflection(server: grpc.Server | grpc.aio.Server, service_names: Iterable[str],
                   authenticator: Authenticator) -> None:
    servicer = (AsyncReflection if isinstance(server, grpc.aio.Server) else Reflection)(service_names, authenticator)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
