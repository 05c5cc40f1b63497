"""Who a request comes from and what it may do: the caller and the scopes (pure; no I/O).

auth.py establishes the caller (client certificate, bearer token); handlers and writers only read it,
so the store records *who* in the audit trail without depending on how they authenticated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from server.errors import PermissionDenied

LOOKUP_CARD = "lookup:card"
LOOKUP_ACCOUNT = "lookup:account"
LOOKUP_CUSTOMER = "lookup:customer"
ADMIN_WRITE = "admin:write"
FEED_READ = "feed:read"     # ChangeFeedService: every change, masked as every answer
IDENTITY_READ = "identity:read"     # IdentityService reads: identity PII (masked national id), reviews
ALL_SCOPES = frozenset({LOOKUP_CARD, LOOKUP_ACCOUNT, LOOKUP_CUSTOMER, ADMIN_WRITE, FEED_READ, IDENTITY_READ})
LOOKUP_SCOPES = frozenset({LOOKUP_CARD, LOOKUP_ACCOUNT, LOOKUP_CUSTOMER})

# The scope each LookupService RPC needs; batch and stream need one lookup scope to be called at all,
# then each key is checked against the scope of its kind (KEY_SCOPE).
LOOKUP_RPC_SCOPE: Mapping[str, frozenset[str]] = {
    "ResolveCard": frozenset({LOOKUP_CARD}),
    "ResolveAccount": frozenset({LOOKUP_ACCOUNT}),
    "GetCustomer": frozenset({LOOKUP_CUSTOMER}),
    "BatchResolve": LOOKUP_SCOPES,
    "StreamResolve": LOOKUP_SCOPES,
    "ResolveBin": frozenset({LOOKUP_CARD}),
}
# IdentityService: reads need identity:read (a switch never has it: its answers carry no identity PII);
# resolving a source reference to a customer id is a lookup; writes are admin writes.
IDENTITY_RPC_SCOPE: Mapping[str, frozenset[str]] = {
    "IdentifyCustomer": frozenset({IDENTITY_READ}),
    "GetCustomerIdentity": frozenset({IDENTITY_READ}),
    "ResolveSourceRef": frozenset({IDENTITY_READ, LOOKUP_CUSTOMER}),
    "ListReviewTasks": frozenset({IDENTITY_READ}),
    "UpdateCustomerIdentity": frozenset({ADMIN_WRITE}),
    "MergeCustomers": frozenset({ADMIN_WRITE}),
    "UnmergeCustomer": frozenset({ADMIN_WRITE}),
    "DecideReviewTask": frozenset({ADMIN_WRITE}),
}
KEY_SCOPE: Mapping[str, str] = {"pan": LOOKUP_CARD, "card_token": LOOKUP_CARD, "account": LOOKUP_ACCOUNT,
                                "customer_id": LOOKUP_CUSTOMER}


@dataclass(frozen=True)
class Caller:
    client_id: str
    scopes: frozenset[str]
    via: str   # "mtls", "jwt" or "anonymous"

    def require_any(self, scopes: frozenset[str], what: str) -> None:
        if not self.scopes & scopes:
            raise PermissionDenied(f"client {self.client_id!r} may not call {what}"
                                   f" (needs {' or '.join(sorted(scopes))})")

    def may(self, scope: str) -> bool:
        return scope in self.scopes


ANONYMOUS = Caller("anonymous", ALL_SCOPES, "anonymous")
