"""AdminService handlers: the write in PostgreSQL (with its outbox row), then the invalidation.

If the invalidation fails (a shard is down) the write still stands — it committed — and the outbox
relay deletes the keys again until every shard has acknowledged. Nothing accepted is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from server.caller import Caller
from server.errors import BackendError, CrsError
from server.logs import LIMIT_KEY
from server.resolver import Resolver
from server.store.admin import AdminStore
from server.store.db import bounded
from server.store.envelope import WriteResult

log = logging.getLogger("crs.admin")
Write = Callable[[Any, Caller], Awaitable[WriteResult]]


class AdminHandlers:
    def __init__(self, *, store: AdminStore, resolver: Resolver) -> None:
        self.store = store
        self.resolver = resolver
        # One handler per RPC, all the same shape: store method, then invalidate.
        writes: dict[str, Write] = {
            "CreateCustomer": store.create_customer, "UpdateCustomer": store.update_customer,
            "SetCustomerStatus": store.set_customer_status, "CreateAccount": store.create_account,
            "SetAccountStatus": store.set_account_status, "CloseAccount": store.close_account,
            "LinkCustomer": store.link_customer, "UnlinkCustomer": store.unlink_customer,
            "IssueCard": store.issue_card, "LinkCard": store.link_card, "SetCardStatus": store.set_card_status,
        }
        for rpc, method in writes.items():
            setattr(self, rpc, self.handler(rpc, method))

    def handler(self, rpc: str, write: Write) -> Callable[[Any, Caller], Awaitable[bytes]]:
        async def handle(request: Any, caller: Caller) -> bytes:
            try:
                result = await write(request, caller)
            except CrsError as exc:
                await self._audit_failure(caller, rpc, request, exc)
                raise
            if result.outbox_id is not None:
                await self._invalidate(rpc, result)
            return result.response

        handle.__name__ = rpc
        return handle

    async def _audit_failure(self, caller: Caller, rpc: str, request: Any, exc: CrsError) -> None:
        """Record the refusal or failure. After a database failure, within one CRS_PG_TIMEOUT: the
        database that just failed would otherwise hold the caller's answer up to 5 x more (its
        statements' bound), and the answer is what the caller waits for."""
        audit = self.store.audit_failure(caller, rpc, request, exc.audit_result or exc.code.name)
        try:
            await (bounded(audit, self.store.timeout) if isinstance(exc, BackendError) else audit)
        except (BackendError, TimeoutError):
            log.warning("could not record a failed write in the audit log", extra={"rpc": rpc, LIMIT_KEY: (rpc,)})

    async def _invalidate(self, rpc: str, result: WriteResult) -> None:
        assert result.outbox_id is not None
        if not await self.resolver.invalidate(result.stale_keys):
            # Every write while a shard is down: limited per RPC (the relay retries each row; its backlog is a metric).
            log.warning("invalidation incomplete; the outbox relay will retry",
                        extra={"rpc": rpc, "outbox_id": result.outbox_id, LIMIT_KEY: (rpc,)})
            return
        try:
            await self.store.mark_invalidated(result.outbox_id)
        except BackendError:
            # Committed and invalidated; only the bookkeeping failed. The relay settles the row.
            log.warning("could not mark outbox row invalidated", extra={"outbox_id": result.outbox_id, LIMIT_KEY: ()})
