"""A client's share of a node process's open streams (both models): the clients file's max_streams, else
CRS_STREAMS_PER_CLIENT (3/4 of CRS_STREAM_THREADS when unset). Pure: the slots without a server."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import pytest

from server.auth import Authenticator, ClientRegistry, ConfigError
from server.caller import Caller
from server.errors import BackendUnavailable, RateLimited
from server.settings import load_settings, streams_per_client_of
from server.stream_stall import StreamSlots


def _slots(clients: dict[str, Any], *, max_streams: int, per_client: int) -> StreamSlots:
    registry = ClientRegistry.from_dict({"clients": clients})
    authenticator = Authenticator(registry=registry, jwt=None, allow_anonymous=False)
    return StreamSlots(max_streams, lambda caller: authenticator.stream_share(caller, per_client))


def _caller(client_id: str) -> Caller:
    return Caller(client_id, frozenset({"lookup:card"}), "mtls")


def test_a_client_past_its_share_is_refused_and_gets_it_back() -> None:
    slots = _slots({"switch": {"scopes": ["lookup:card"]}, "big": {"scopes": ["lookup:card"], "max_streams": 3},
                    "other": {"scopes": ["lookup:card"]}}, max_streams=6, per_client=2)
    with ExitStack() as held:
        for _ in range(2):
            held.enter_context(slots.slot(_caller("switch")))
        with pytest.raises(RateLimited, match="'switch' already holds 2 open streams"), \
                slots.slot(_caller("switch")):
            pass
        for _ in range(3):   # its own max_streams, above the node's default share
            held.enter_context(slots.slot(_caller("big")))
        with pytest.raises(RateLimited), slots.slot(_caller("big")):
            pass
        held.enter_context(slots.slot(_caller("other")))   # the sixth: the node is full now
        with pytest.raises(BackendUnavailable, match="6 open streams"), slots.slot(_caller("other")):
            pass
    # Every stream ended: every share and slot is back (a refused stream kept none).
    with ExitStack() as held:
        for who in ("switch", "switch", "big", "big", "big", "other"):
            held.enter_context(slots.slot(_caller(who)))


def test_the_default_share_and_a_bad_max_streams() -> None:
    assert streams_per_client_of(load_settings({})) == 384                       # of 512
    assert streams_per_client_of(load_settings({"CRS_STREAM_THREADS": "2"})) == 2
    assert streams_per_client_of(load_settings({"CRS_STREAMS_PER_CLIENT": "10"})) == 10
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ConfigError, match="max_streams must be a whole number"):
            ClientRegistry.from_dict({"clients": {"x": {"scopes": [], "max_streams": bad}}})
