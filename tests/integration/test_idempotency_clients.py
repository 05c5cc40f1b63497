"""A request_id is the client's that sent it (migration 0017). Keyed by request_id alone, another
client with admin:write that knew it got the first client's stored answer replayed, or was refused
its own write. The store on the real PostgreSQL of the shared environment, called as two clients
(the dev PKI has one admin client, so the gRPC side is test_admin.py's)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from devstack.environment import DevEnvironment
from server.caller import Caller
from server.errors import AlreadyExists
from server.proto import crs_pb2 as pb
from server.store.admin import AdminStore
from server.store.db import active_data_key, create_pool

pytestmark = pytest.mark.integration
OPS = Caller("ops", frozenset({"admin:write"}), "mtls")
BILLING = Caller("billing", frozenset({"admin:write"}), "mtls")


def test_a_request_id_is_its_clients(dev_env: DevEnvironment) -> None:
    settings = dev_env.settings()

    async def run() -> None:
        pool = await create_pool(settings)
        try:
            keyring = settings.keyring()
            store = AdminStore(pool=pool, keyring=keyring, data_key=await active_data_key(pool, keyring), timeout=5)
            rid = f"shared-{uuid.uuid4()}"
            mine = await store.create_customer(pb.CreateCustomerRequest(request_id=rid, display_name="Ops Ltd"), OPS)
            assert (await store.create_customer(pb.CreateCustomerRequest(request_id=rid, display_name="Ops Ltd"),
                                                OPS)).response == mine.response            # a retry replays
            theirs = await store.create_customer(pb.CreateCustomerRequest(request_id=rid, display_name="Ops Ltd"),
                                                 BILLING)
            assert theirs.outbox_id is not None and theirs.response != mine.response   # a write of its own
            with pytest.raises(AlreadyExists, match="other arguments"):   # its own request_id, as for anyone
                await store.create_customer(pb.CreateCustomerRequest(request_id=rid, display_name="Billing Co"),
                                            BILLING)
        finally:
            await pool.close()

    asyncio.run(run())
