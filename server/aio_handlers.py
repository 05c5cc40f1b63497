"""The grpc.aio serving model's method handlers (CRS_SERVING_MODEL=aio): the gate, the parse, the
node's async handler, the error mapping and the metrics around each method; server/hybrid.py builds
the same for the synchronous grpc.server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from server import rpc
from server.caller import Caller
from server.gate import Gate, failed_call, request_parser
from server.metrics import Metrics
from server.stream_stall import StallWatch, StreamSlots


async def _fail(context: grpc.aio.ServicerContext, exc: Exception, name: str, metrics: Metrics,
                started: float) -> NoReturn:
    code, message, trailer = failed_call(exc, name, metrics, started)
    if trailer:
        await context.abort(code, message, trailer)
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def _unary(method: rpc.Method, fn: Callable[[Any, Caller], Awaitable[bytes]], metrics: Metrics,
           gate: Gate) -> grpc.RpcMethodHandler:
    name = method.name
    parse = request_parser(method)
    scopes, cost = gate.scopes_for(method), gate.entry_cost(method)

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        try:
            caller = gate.admit(context, scopes, name, cost)
            response = await fn(parse(raw), caller)
        except Exception as exc:
            await _fail(context, exc, name, metrics, started)
        metrics.observe_rpc(name, "OK", time.perf_counter() - started)
        return response

    # No (de)serializers: requests are parsed inside the handler so a corrupt message maps to
    # INVALID_ARGUMENT (grpc would answer UNKNOWN), and responses are already serialized bytes.
    return grpc.unary_unary_rpc_method_handler(handler)


def _streaming(method: rpc.Method, fn: Callable[[Any, Caller], AsyncIterator[bytes]], metrics: Metrics,
               gate: Gate, stalls: StallWatch, slots: StreamSlots) -> grpc.RpcMethodHandler:
    """A server-streaming RPC (Watch, Snapshot) or a bidi one (StreamResolve): the same gate, the same
    failure path; only what the handler gets as its request differs (one message or a stream). Open, it
    holds one of the process's stream slots within its client's share, as in the hybrid model."""
    name = method.name
    parse = request_parser(method)
    scopes, cost = gate.scopes_for(method), gate.entry_cost(method)

    async def parsed(raw_items: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raw_items:
            yield parse(raw)

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        try:
            caller = gate.admit(context, scopes, name, cost)
            with slots.slot(caller):
                items = fn(parsed(request) if method.client_streaming else parse(request), caller)
                async for item in stalls.aio_stream(name, items, context):   # a stalled reader is ended there
                    yield item
        except Exception as exc:
            await _fail(context, exc, name, metrics, started)
        metrics.observe_rpc(name, "OK", time.perf_counter() - started)

    if method.client_streaming:
        return grpc.stream_stream_rpc_method_handler(handler)
    return grpc.unary_stream_rpc_method_handler(handler)


def generic_handler(service: Any, target: object, metrics: Metrics, gate: Gate,
                    stalls: StallWatch, slots: StreamSlots) -> grpc.GenericRpcHandler:
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, method in rpc.methods(service).items():
        fn = getattr(target, name)
        if method.server_streaming:
            handlers[name] = _streaming(method, fn, metrics, gate, stalls, slots)
        else:
            handlers[name] = _unary(method, fn, metrics, gate)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
