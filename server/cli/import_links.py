"""Rows of `crs import accounts|cards`: validated with server/pan.py and written through the admin
write path (server/store/admin.py), one write envelope per row, so an imported account or card is
fingerprinted (every configured key version during a rotation), encrypted, audited, published on the
feed and invalidated in the cache exactly as CreateAccount and IssueCard do it.

The request id of each write is derived from the row's source reference: a re-run of the file
replays the stored answer (reported as `existing`) instead of writing twice. Reports and rejects
show only masked numbers (first six and last four of a PAN, last four of an account number).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import asyncpg

from server.caller import ADMIN_WRITE, Caller
from server.cli.import_files import Reject, shape, source_key
from server.crypto import DataKey, Keyring
from server.currencies import DEFAULT_CURRENCY, is_currency
from server.errors import AlreadyExists, FailedPrecondition, InvalidKey, NotFound
from server.pan import (
    mask_account_number,
    mask_pan,
    parse_account_number,
    parse_expiry,
    parse_pan,
    parse_routing_number,
)
from server.proto import crs_pb2 as pb
from server.store.admin import AdminStore
from server.store.bulk import IMPORT_CLIENT, begin_run, finish_run

_CALLER = Caller(IMPORT_CLIENT, frozenset({ADMIN_WRITE}), "cli")
_ACCOUNT_TYPES = {name.removeprefix("ACCOUNT_TYPE_"): value for name, value in pb.AccountType.items() if value}


@dataclass(frozen=True)
class AccountRow:
    row: int
    key: str
    customer_key: str
    routing: str
    number: str
    type: int
    currency: str


@dataclass(frozen=True)
class CardRow:
    row: int
    key: str
    routing: str
    number: str
    pan: str
    expiry: str


def _number_problem(row: int, column: str, cell: str, exc: InvalidKey) -> Reject:
    # server/pan.py's messages name the rule, never the number.
    reason = str(exc).removeprefix(f"{column} ").removeprefix("pan ")
    return Reject(row, column, reason, shape(cell))


class LinkWriter(AdminStore):
    def __init__(self, *, pool: asyncpg.Pool, keyring: Keyring, data_key: DataKey, timeout: float, system: str,
                 customer_system: str) -> None:
        super().__init__(pool=pool, keyring=keyring, data_key=data_key, timeout=timeout)
        self.system, self.customer_system = system, customer_system

    async def begin(self, run: str, kind: str) -> None:
        await begin_run(self.pool, run, self.system, kind)

    async def finish(self, run: str, rows: int) -> None:
        await finish_run(self.pool, run, rows)

    # -- parsing -------------------------------------------------------------------------------
    def parse_account(self, row: int, key: str, cells: dict[str, str]) -> AccountRow | Reject:
        owner = source_key(row, cells["customer_source_ref"], "customer_source_ref")
        if isinstance(owner, Reject):
            return owner
        parsed = self._numbers(row, cells)
        if isinstance(parsed, Reject):
            return parsed
        kind = cells["type"].strip().upper() or "CHECKING"
        if kind not in _ACCOUNT_TYPES:
            return Reject(row, "type", f"must be one of {', '.join(_ACCOUNT_TYPES)}", shape(cells["type"]))
        currency = cells["currency"].strip() or DEFAULT_CURRENCY
        if not is_currency(currency):
            return Reject(row, "currency", "must be an ISO 4217 code such as USD", shape(cells["currency"]))
        return AccountRow(row, key, owner, *parsed, _ACCOUNT_TYPES[kind], currency)

    def parse_card(self, row: int, key: str, cells: dict[str, str]) -> CardRow | Reject:
        parsed = self._numbers(row, cells)
        if isinstance(parsed, Reject):
            return parsed
        try:
            pan = parse_pan(cells["pan"].strip())
        except InvalidKey as exc:
            return _number_problem(row, "pan", cells["pan"], exc)
        try:
            expiry = parse_expiry(cells["expiry"].strip())
        except InvalidKey as exc:
            return _number_problem(row, "expiry", cells["expiry"], exc)
        return CardRow(row, key, *parsed, pan, expiry)

    @staticmethod
    def _numbers(row: int, cells: dict[str, str]) -> tuple[str, str] | Reject:
        try:
            routing = parse_routing_number(cells["routing_number"].strip())
        except InvalidKey as exc:
            return _number_problem(row, "routing_number", cells["routing_number"], exc)
        try:
            number = parse_account_number(cells["account_number"].strip())
        except InvalidKey as exc:
            return _number_problem(row, "account_number", cells["account_number"], exc)
        return routing, number

    # -- writing -------------------------------------------------------------------------------
    def _request_id(self, kind: str, key: str) -> str:
        return f"import:{kind}:" + hashlib.sha256(f"{self.system}\0{key}".encode()).hexdigest()[:40]

    async def write(self, kind: str, item: Any, run: str) -> tuple[Any, ...] | Reject:
        """One account or card: its report line, or why it was refused (masked)."""
        try:
            if kind == "accounts":
                return await self._account(item)
            return await self._card(item)
        except (NotFound, FailedPrecondition, AlreadyExists, InvalidKey) as exc:
            column = "customer_source_ref" if kind == "accounts" and isinstance(exc, NotFound) else \
                "account_number" if isinstance(exc, NotFound) else "pan" if kind == "cards" else "account_number"
            return Reject(item.row, column, str(exc))

    async def _account(self, item: AccountRow) -> tuple[Any, ...]:
        owner = await self.pool.fetchval(
            "SELECT coalesce(c.merged_into, s.customer_id) FROM source_records s JOIN customers c"
            " ON c.customer_id = s.customer_id WHERE s.source_system = $1 AND s.source_key = $2",
            self.customer_system, item.customer_key, timeout=self.timeout)
        if owner is None:
            raise NotFound(f"no customer of {self.customer_system} has this customer_source_ref")
        masked = f"{item.routing} {mask_account_number(item.number[-4:], len(item.number))}"
        existing = await self._existing_account(item, owner)
        if existing is not None:
            return item.row, item.key, existing, "existing", owner, masked
        result = await self.create_account(pb.CreateAccountRequest(
            request_id=self._request_id("account", item.key), owner_customer_id=owner,
            routing_number=item.routing, account_number=item.number, type=item.type,  # type: ignore[arg-type]
            currency=item.currency), _CALLER)
        account = pb.Account.FromString(result.response)
        decision = "existing" if result.outbox_id is None else "created"
        return item.row, item.key, account.account_id, decision, owner, masked

    async def _existing_account(self, item: AccountRow, owner: str) -> str | None:
        """The row's account when a run before this one loaded it: answered from the table, not by
        replaying the request (whose owner a merge since may have changed to its survivor). One that
        is not this row's (another owner, type or currency) is refused as CreateAccount would."""
        account_id = await self.find_account(item.routing, item.number)
        if account_id is None:
            return None
        found = await self.pool.fetchrow(
            "SELECT a.account_type, a.currency, (SELECT customer_id FROM account_customers"
            " WHERE account_id = a.account_id AND role = $2) AS owner FROM accounts a WHERE a.account_id = $1",
            account_id, pb.RELATIONSHIP_ROLE_OWNER, timeout=self.timeout)
        if found is None or (found["account_type"], found["currency"], found["owner"]) != (item.type, item.currency,
                                                                                           owner):
            raise AlreadyExists("this routing and account number is already another account (another owner,"
                                " type or currency)")
        return account_id

    async def _card(self, item: CardRow) -> tuple[Any, ...]:
        account_id = await self.find_account(item.routing, item.number)
        if account_id is None:
            raise NotFound("no account has this routing and account number")
        result = await self.issue_card(pb.IssueCardRequest(
            request_id=self._request_id("card", item.key), pan=item.pan, expiry=item.expiry,
            account_id=account_id), _CALLER)
        card = pb.Card.FromString(result.response)
        decision = "existing" if result.outbox_id is None else "created"
        return (item.row, item.key, card.token, decision, account_id, mask_pan(item.pan))
