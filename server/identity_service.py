"""IdentityService handlers: identification, the golden record and crosswalk, identity updates,
merge and unmerge, and the review queue (docs/identity.md).

Writes go through the write envelope and then invalidate the cache keys they made stale, exactly
as AdminService writes do (server/admin.py), so the relay retries a delete that failed.
"""

from __future__ import annotations

from server.admin import AdminHandlers
from server.caller import Caller
from server.errors import InvalidKey
from server.pan import parse_customer_id
from server.proto import crs_pb2 as pb
from server.store.identity import IdentityReads, decision_msg
from server.store.identity_writes import MAX_CANDIDATES, parse_request_identity, parse_request_source
from server.store.merge import IdentityStore

MAX_CANDIDATES_ASKED = 50


class IdentityHandlers:
    def __init__(self, *, reads: IdentityReads, writes: AdminHandlers) -> None:
        self.reads = reads
        # The write RPCs share AdminHandlers' shape: store write, then invalidate (and audit failures).
        store = writes.store
        if not isinstance(store, IdentityStore):
            raise TypeError("IdentityHandlers needs AdminHandlers over an IdentityStore")
        self.store = store
        self.UpdateCustomerIdentity = writes.handler("UpdateCustomerIdentity", store.update_customer_identity)
        # Merge, unmerge and review decisions: server/store/merge.py.
        self.MergeCustomers = writes.handler("MergeCustomers", store.merge_customers)
        self.UnmergeCustomer = writes.handler("UnmergeCustomer", store.unmerge_customer)
        self.DecideReviewTask = writes.handler("DecideReviewTask", store.decide_review)

    async def IdentifyCustomer(self, req: pb.IdentifyCustomerRequest, caller: Caller) -> bytes:
        identity = parse_request_identity(req.attributes, "attributes")
        if not 0 <= req.max_candidates <= MAX_CANDIDATES_ASKED:
            raise InvalidKey(f"max_candidates must be 0-{MAX_CANDIDATES_ASKED}")
        decision = await self.reads.identify(identity, req.max_candidates or MAX_CANDIDATES)
        return decision_msg(decision, self.reads.model).SerializeToString()

    async def GetCustomerIdentity(self, req: pb.GetCustomerIdentityRequest, caller: Caller) -> bytes:
        if req.WhichOneof("key") == "source_ref":
            ref = await self.reads.resolve_source_ref(parse_request_source(req.source_ref))
            customer_id = ref.customer_id
        elif req.WhichOneof("key") == "customer_id":
            customer_id = parse_customer_id(req.customer_id)
        else:
            raise InvalidKey("give a customer_id or a source_ref")
        return (await self.reads.customer_identity(customer_id)).SerializeToString()

    async def ResolveSourceRef(self, req: pb.SourceRef, caller: Caller) -> bytes:
        return (await self.reads.resolve_source_ref(parse_request_source(req))).SerializeToString()

    async def ListReviewTasks(self, req: pb.ListReviewTasksRequest, caller: Caller) -> bytes:
        return (await self.store.list_reviews(req)).SerializeToString()
