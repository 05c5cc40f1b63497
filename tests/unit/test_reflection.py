"""Server reflection answers callers the node knows and refuses the others with UNAUTHENTICATED
before its first answer (server/reflection.py), in both serving models' flavours. No servers: a fake
call context; tests/integration/test_security.py checks it through TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from server import rpc
from server.auth import Authenticator
from server.caller import Caller
from server.reflection import SERVICE_NAME, AsyncReflection, Reflection

NAMES = [svc.full_name for svc in rpc.SERVICES] + [SERVICE_NAME]


class Aborted(Exception):
    pass


class FakeContext:
    """What the authenticator reads (metadata, TLS auth context) and abort, as a servicer sees them."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


class FakeAsyncContext(FakeContext):
    async def abort(self, code: grpc.StatusCode, details: str) -> None:  # type: ignore[override]
        FakeContext.abort(self, code, details)


def _authenticator(*, anonymous: bool) -> Authenticator:
    return Authenticator(registry=None, jwt=None, allow_anonymous=anonymous, mtls=True)


LIST = reflection_pb2.ServerReflectionRequest(list_services="")


def _sync(anonymous: bool) -> tuple[list[Any], FakeContext]:
    context = FakeContext()
    servicer = Reflection(NAMES, _authenticator(anonymous=anonymous))
    answers: list[Any] = []
    try:
        answers.extend(servicer.ServerReflectionInfo(iter([LIST]), context))
    except Aborted:
        pass
    return answers, context


def _async(anonymous: bool) -> tuple[list[Any], FakeContext]:
    context = FakeAsyncContext()
    servicer = AsyncReflection(NAMES, _authenticator(anonymous=anonymous))

    async def requests() -> AsyncIterator[Any]:
        yield LIST

    async def run() -> list[Any]:
        answers = []
        try:
            async for answer in servicer.ServerReflectionInfo(requests(), context):
                answers.append(answer)
        except Aborted:
            pass
        return answers

    return asyncio.run(run()), context


@pytest.mark.parametrize("flavour", [_sync, _async])
def test_an_unknown_caller_is_refused_before_any_answer(flavour: Any) -> None:
    answers, context = flavour(False)
    assert answers == [] and context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("flavour", [_sync, _async])
def test_a_known_caller_lists_the_services(flavour: Any) -> None:
    answers, context = flavour(True)      # anonymous allowed: the dev-only setting admits every caller
    assert context.aborted is None
    (answer,) = answers
    assert {s.name for s in answer.list_services_response.service} == set(NAMES)


class _Switch(Authenticator):
    """A registered client `switch` allowed 2 calls in a burst and nearly nothing after."""

    def __init__(self) -> None:
        from server.auth import ClientPolicy, ClientRegistry

        policy = ClientPolicy("switch", frozenset(), rate_per_s=0.001, burst=2)
        super().__init__(registry=ClientRegistry({"switch": policy}), jwt=None, allow_anonymous=False)

    def authenticate(self, context: Any) -> Caller:
        return Caller("switch", frozenset(), "mtls")


@pytest.mark.parametrize("model", ["sync", "aio"])
def test_each_reflection_request_costs_the_caller_a_token(model: str) -> None:
    """A registered client looping on reflection requests was not rate-limited at all (tenth audit)."""
    requests = [LIST] * 3
    if model == "sync":
        context: FakeContext = FakeContext()
        answers: list[Any] = []
        with pytest.raises(Aborted):
            for answer in Reflection(NAMES, _Switch()).ServerReflectionInfo(iter(requests), context):
                answers.append(answer)
    else:
        context = FakeAsyncContext()

        async def feed() -> AsyncIterator[Any]:
            for request in requests:
                yield request

        async def run() -> list[Any]:
            got = []
            with pytest.raises(Aborted):
                async for answer in AsyncReflection(NAMES, _Switch()).ServerReflectionInfo(feed(), context):
                    got.append(answer)
            return got

        answers = asyncio.run(run())
    assert len(answers) == 2
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its rate limit" in context.aborted[1]
