"""Admin writes of customers, accounts, relationships and cards, each inside the write envelope
(server/store/envelope.py: one transaction with its outbox, idempotency and audit rows).

Each write returns the serialized response, the cache keys it made stale and the outbox row id.
The caller (server/admin.py) invalidates those keys after commit; the relay retries what failed."""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg

from server import cache_keys as ck
from server.caller import Caller
from server.crypto import ACCOUNT_PURPOSE, PAN_PURPOSE, DataKey, Keyring, account_fingerprint_input
from server.currencies import parse_currency
from server.errors import AlreadyExists, FailedPrecondition, InvalidKey, NotFound, VersionConflict
from server.pan import (
    contains_card_number,
    mask_account_number,
    mask_pan,
    parse_account_id,
    parse_account_number,
    parse_customer_id,
    parse_expiry,
    parse_pan,
    parse_routing_number,
    parse_token,
    plain_text,
)
from server.proto import crs_pb2 as pb
from server.store import edges, lifecycle
from server.store.db import Conn, required
from server.store.envelope import Change, Request, WriteEnvelope, WriteResult
from server.store.messages import account_msg, card_msg, customer_msg

_ID_ALPHABET = string.ascii_lowercase + string.digits
# Random bytes below 252 (7 x 36) map to it without bias, the rest are dropped (~1 us an id; 38 by secrets.choice)
_ID_TABLE, _ID_DROP = bytes(ord(_ID_ALPHABET[b % 36]) for b in range(252)) + bytes(4), bytes(range(252, 256))
MAX_NAME = 200
GONE = {pb.CUSTOMER_STATUS_CLOSED: "closed", pb.CUSTOMER_STATUS_DECEASED: "deceased"}   # take nothing new


def new_id(prefix: str, length: int = 20) -> str:
    chars = secrets.token_bytes(length + 8).translate(_ID_TABLE, _ID_DROP)[:length].decode("ascii")
    return prefix + chars if len(chars) == length and not contains_card_number(chars) else new_id(prefix, length)


class AdminStore(WriteEnvelope):
    def __init__(self, *, pool: asyncpg.Pool, keyring: Keyring, data_key: DataKey, timeout: float) -> None:
        super().__init__(pool=pool, keyring=keyring, timeout=timeout)
        self.data_key = data_key

    # -- helpers ---------------------------------------------------------------------------------
    stale_keys_for_accounts = staticmethod(edges.stale_keys_for_accounts)

    def every_version(self, key: Callable[[int, bytes], str], value: str) -> list[str]:
        """A new card's or account's key under every configured fingerprint version: a node still on an
        older version than this one (rotation step 3) may hold NOT_FOUND for it under its own key."""
        return [key(v, self.keyring.fingerprint(value, v)) for v in sorted(self.keyring.fingerprint_keys)]

    @staticmethod
    async def customer_keys(conn: Conn, customer_ids: Iterable[str]) -> list[str]:
        """The profile keys of these customers and of every customer merged into them (their aliases
        answer the survivor's profile, cached under the alias's own key)."""
        ids = sorted(set(customer_ids))
        aliases = await conn.fetch("SELECT customer_id FROM customers WHERE merged_into = ANY($1::text[])", ids)
        return [ck.customer_key(c) for c in ids] + [ck.customer_key(r["customer_id"]) for r in aliases]

    @staticmethod
    def refuse_merged(row: asyncpg.Record, what: str = "customer") -> None:
        """Writes go to the survivor, never to a merged customer (an alias)."""
        if row["merged_into"]:
            raise FailedPrecondition(f"{what} was merged into {row['merged_into']}: write to that one")

    @staticmethod
    async def _accounts_of(conn: Conn, customer_id: str) -> list[str]:
        return [r["account_id"] for r in await conn.fetch(
            "SELECT account_id FROM account_customers WHERE customer_id = $1", customer_id)]

    @staticmethod
    async def _roles(conn: Conn, account_id: str) -> dict[str, int]:
        return {r["customer_id"]: r["role"] for r in await conn.fetch(
            "SELECT customer_id, role FROM account_customers WHERE account_id = $1", account_id)}

    @staticmethod
    def _owners(roles: dict[str, int]) -> list[str]:
        return [c for c, role in roles.items() if role == pb.RELATIONSHIP_ROLE_OWNER]

    @staticmethod
    def _check_version(entity: str, expected: int, actual: int) -> None:
        if expected and expected != actual:
            raise VersionConflict(f"{entity} is at version {actual}, not the expected {expected}")

    @staticmethod
    def _check_enum(enum: Any, value: int, field_name: str) -> None:
        if value == 0 or value not in enum.values():
            raise InvalidKey(f"{field_name} must be one of {', '.join(enum.keys()[1:])}")

    async def _taken_under_any_version(self, conn: Conn, spec: str, value: str) -> bool:
        """During a fingerprint rotation the same number may be stored under another version: look
        for it under every configured one, serialised by a lock on the oldest version's fingerprint."""
        versions = sorted(self.keyring.fingerprint_keys)
        if len(versions) == 1:
            return False
        lock_fp = self.keyring.fingerprint(value, versions[0])
        await conn.execute("SELECT pg_advisory_xact_lock($1)", int.from_bytes(lock_fp[:8], "big", signed=True))
        table, col, next_col = (("cards", "pan_fingerprint", "next_pan_fingerprint") if spec == "card"
                                else ("accounts", "account_fingerprint", "next_account_fingerprint"))
        for v in versions:
            fp = self.keyring.fingerprint(value, v)
            if await conn.fetchval(f"SELECT 1 FROM {table} WHERE (fingerprint_version = $1 AND {col} = $2)"
                                   f" OR (next_fingerprint_version = $1 AND {next_col} = $2)", v, fp):
                return True
        return False

    async def find_account(self, routing: str, number: str) -> str | None:
        """The account with this routing and account number, under any configured fingerprint version."""
        value = account_fingerprint_input(routing, number)
        for v in sorted(self.keyring.fingerprint_keys, reverse=True):
            fp = self.keyring.fingerprint(value, v)
            found = await self.pool.fetchval(
                "SELECT account_id FROM accounts WHERE (fingerprint_version = $1 AND account_fingerprint = $2)"
                " OR (next_fingerprint_version = $1 AND next_account_fingerprint = $2)", v, fp, timeout=self.timeout)
            if found is not None:
                return str(found)
        return None

    lock_accounts = staticmethod(edges.lock_accounts)

    async def _open_account(self, conn: Conn, account_id: str) -> asyncpg.Record:
        """An open account, locked as one whose cards or customers this write changes (`lock_accounts`)."""
        row = await conn.fetchrow("SELECT * FROM accounts WHERE account_id = $1 FOR NO KEY UPDATE", account_id)
        if row is None:
            raise NotFound("account not found")
        if row["status"] == pb.ACCOUNT_STATUS_CLOSED:
            raise FailedPrecondition("account is closed")
        return required(row)

    # -- customers -----------------------------------------------------------------------------
    def customer_fields(self, req: pb.CreateCustomerRequest, default_name: str = "") -> tuple[str, str, int]:
        """(display name, segment, KYC status) of a CreateCustomer request, validated."""
        name = plain_text("display_name", req.display_name.strip() or default_name, MAX_NAME)
        kyc = req.kyc_status or pb.KYC_STATUS_PENDING
        self._check_enum(pb.KycStatus, kyc, "kyc_status")
        return name, plain_text("segment", req.segment.strip() or "retail", MAX_NAME), kyc

    async def create_customer(self, req: pb.CreateCustomerRequest, caller: Caller) -> WriteResult:
        name, segment, kyc = self.customer_fields(req)

        async def body(conn: Conn) -> Change:
            row = required(await conn.fetchrow(
                "INSERT INTO customers (customer_id, display_name, segment, status, kyc_status)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING *",
                new_id("cus_"), name, segment, pb.CUSTOMER_STATUS_ACTIVE, kyc))
            cid = row["customer_id"]
            return Change(customer_msg(row), [ck.customer_key(cid)], "customer.created", "customer", cid,
                          {"segment": segment, "kyc_status": kyc})

        return await self._write("CreateCustomer", req, body, caller)

    async def _change_customer(self, rpc: str, req: Request, customer_id: str, expected: int,
                               changes: dict[str, Any], event: str, caller: Caller) -> WriteResult:
        parse_customer_id(customer_id)

        async def body(conn: Conn) -> Change:
            cur = await conn.fetchrow("SELECT * FROM customers WHERE customer_id = $1 FOR UPDATE", customer_id)
            if cur is None:
                raise NotFound("customer not found")
            self.refuse_merged(cur)
            self._check_version("customer", expected, cur["version"])
            sets = ", ".join(f"{col} = ${i + 2}" for i, col in enumerate(changes))
            row = required(await conn.fetchrow(
                f"UPDATE customers SET {sets}{', ' if sets else ''}version = version + 1, updated_at = now()"
                " WHERE customer_id = $1 RETURNING *", customer_id, *changes.values()))
            accounts = await self._accounts_of(conn, customer_id)
            await self.lock_accounts(conn, accounts, edges=False)
            stale = await self.customer_keys(conn, [customer_id])
            stale += await self.stale_keys_for_accounts(conn, accounts)
            return Change(customer_msg(row), stale, event, "customer", customer_id,
                          {k: v for k, v in changes.items() if k != "display_name"} | {"version": row["version"]})

        return await self._write(rpc, req, body, caller)

    async def update_customer(self, req: pb.UpdateCustomerRequest, caller: Caller) -> WriteResult:
        changes: dict[str, Any] = {}
        if req.display_name:
            changes["display_name"] = plain_text("display_name", req.display_name.strip(), MAX_NAME)
        if req.segment:
            changes["segment"] = plain_text("segment", req.segment.strip(), MAX_NAME)
        if req.kyc_status:
            self._check_enum(pb.KycStatus, req.kyc_status, "kyc_status")
            changes["kyc_status"] = req.kyc_status
        if not changes:   # it would still move the version: every other client's expected_version goes stale
            raise InvalidKey("UpdateCustomer changes nothing: set display_name, segment or kyc_status")
        return await self._change_customer("UpdateCustomer", req, req.customer_id,
                                           req.expected_version, changes, "customer.updated", caller)

    async def set_customer_status(self, req: pb.SetCustomerStatusRequest, caller: Caller) -> WriteResult:
        self._check_enum(pb.CustomerStatus, req.status, "status")
        return await self._change_customer("SetCustomerStatus", req, req.customer_id,
                                           req.expected_version, {"status": req.status},
                                           "customer.status_changed", caller)

    # -- accounts ------------------------------------------------------------------------------
    async def create_account(self, req: pb.CreateAccountRequest, caller: Caller) -> WriteResult:
        routing = parse_routing_number(req.routing_number)
        number = parse_account_number(req.account_number)
        self._check_enum(pb.AccountType, req.type, "type")
        currency = parse_currency(req.currency)
        owner = parse_customer_id(req.owner_customer_id)
        version = self.keyring.fingerprint_version
        fp = self.keyring.fingerprint(account_fingerprint_input(routing, number))
        next_version = self.keyring.rotation_target
        next_fp = self.keyring.fingerprint(account_fingerprint_input(routing, number), next_version) \
            if next_version else None

        async def body(conn: Conn) -> Change:
            cust = await conn.fetchrow("SELECT status, merged_into FROM customers WHERE customer_id = $1 FOR SHARE",
                                       owner)
            if cust is None:
                raise NotFound("owner customer not found")
            self.refuse_merged(cust, "owner customer")
            if cust["status"] in GONE:
                raise FailedPrecondition(f"owner customer is {GONE[cust['status']]}")
            account_id = new_id("acc_")
            if await self._taken_under_any_version(conn, "account", account_fingerprint_input(routing, number)):
                raise AlreadyExists(f"an account {mask_account_number(number[-4:])} already exists"
                                    " at this routing number")
            try:
                row = required(await conn.fetchrow(
                    "INSERT INTO accounts (account_id, routing_number, fingerprint_version, account_fingerprint,"
                    " account_last4, account_length, account_ciphertext, dek_id, account_type, currency, status,"
                    " next_fingerprint_version, next_account_fingerprint)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13) RETURNING *",
                    account_id, routing, version, fp, number[-4:], len(number),
                    self.data_key.encrypt(number, purpose=ACCOUNT_PURPOSE), self.data_key.dek_id,
                    req.type, currency, pb.ACCOUNT_STATUS_OPEN, next_version, next_fp))
            except asyncpg.UniqueViolationError as exc:
                raise AlreadyExists(f"an account {mask_account_number(number[-4:])} already exists"
                                    " at this routing number") from exc
            await conn.execute("INSERT INTO account_customers (account_id, customer_id, role) VALUES ($1, $2, $3)",
                               account_id, owner, pb.RELATIONSHIP_ROLE_OWNER)
            # The account key may hold a negative entry from an earlier lookup of this number.
            stale = [*self.every_version(ck.account_key, account_fingerprint_input(routing, number)),
                     *await self.customer_keys(conn, [owner])]
            owned = pb.RelationshipResponse(account_id=account_id, customer_id=owner, role=pb.RELATIONSHIP_ROLE_OWNER)
            return Change(account_msg(row), stale, "account.created", "account", account_id,
                          {"owner": owner, "type": req.type, "currency": currency, "routing": routing},
                          also=(("relationship.linked", owned),))

        return await self._write("CreateAccount", req, body, caller)

    async def _change_account_status(self, rpc: str, req: Request, account_id: str, expected: int,
                                     status: int, caller: Caller) -> WriteResult:
        parse_account_id(account_id)
        self._check_enum(pb.AccountStatus, status, "status")

        async def body(conn: Conn) -> Change:
            cur = await conn.fetchrow("SELECT * FROM accounts WHERE account_id = $1 FOR UPDATE", account_id)
            if cur is None:
                raise NotFound("account not found")
            self._check_version("account", expected, cur["version"])
            if cur["status"] == pb.ACCOUNT_STATUS_CLOSED and status != pb.ACCOUNT_STATUS_CLOSED:
                raise FailedPrecondition("account is closed; a closed account cannot change status")
            row = required(await conn.fetchrow(
                "UPDATE accounts SET status = $2, version = version + 1, updated_at = now()"
                " WHERE account_id = $1 RETURNING *", account_id, status))
            stale = await self.stale_keys_for_accounts(conn, [account_id])
            return Change(account_msg(row), stale, "account.status_changed", "account", account_id,
                          {"status": status, "version": row["version"]})

        return await self._write(rpc, req, body, caller)

    async def set_account_status(self, req: pb.SetAccountStatusRequest, caller: Caller) -> WriteResult:
        return await self._change_account_status("SetAccountStatus", req, req.account_id,
                                                 req.expected_version, req.status, caller)

    async def close_account(self, req: pb.CloseAccountRequest, caller: Caller) -> WriteResult:
        return await self._change_account_status("CloseAccount", req, req.account_id,
                                                 req.expected_version, pb.ACCOUNT_STATUS_CLOSED, caller)

    # -- relationships -------------------------------------------------------------------------
    async def link_customer(self, req: pb.LinkCustomerRequest, caller: Caller) -> WriteResult:
        account_id = parse_account_id(req.account_id)
        customer_id = parse_customer_id(req.customer_id)
        self._check_enum(pb.RelationshipRole, req.role, "role")

        async def body(conn: Conn) -> Change:
            cust = await conn.fetchrow("SELECT status, merged_into FROM customers WHERE customer_id = $1 FOR SHARE",
                                       customer_id)
            if cust is None:
                raise NotFound("customer not found")
            self.refuse_merged(cust)
            if cust["status"] in GONE:     # as CreateAccount's owner
                raise FailedPrecondition(f"customer is {GONE[cust['status']]}")
            await self._open_account(conn, account_id)
            roles = await self._roles(conn, account_id)
            if (roles.get(customer_id) == pb.RELATIONSHIP_ROLE_OWNER and req.role != pb.RELATIONSHIP_ROLE_OWNER
                    and self._owners(roles) == [customer_id]):
                raise FailedPrecondition("cannot change the role of the only owner of an account:"
                                         " link another owner first")
            answer = pb.RelationshipResponse(account_id=account_id, customer_id=customer_id, role=req.role)
            if roles.get(customer_id) == req.role:   # held already: nothing to write or announce
                return Change(answer, [], "", "account", account_id, {"customer_id": customer_id}, unchanged=True)
            inserted = await conn.fetchval(
                "INSERT INTO account_customers (account_id, customer_id, role) VALUES ($1, $2, $3)"
                " ON CONFLICT (account_id, customer_id) DO UPDATE SET role = EXCLUDED.role"
                " RETURNING xmax = 0", account_id, customer_id, req.role)
            return Change(answer, await self.stale_keys_for_accounts(conn, [account_id]), "relationship.linked"
                          if inserted else "relationship.role_changed", "account", account_id,
                          {"customer_id": customer_id, "role": req.role})

        return await self._write("LinkCustomer", req, body, caller)

    async def unlink_customer(self, req: pb.UnlinkCustomerRequest, caller: Caller) -> WriteResult:
        account_id = parse_account_id(req.account_id)
        customer_id = parse_customer_id(req.customer_id)

        async def body(conn: Conn) -> Change:
            # The customer, then the account, as every write that changes an account's customers.
            await conn.execute("SELECT 1 FROM customers WHERE customer_id = $1 FOR SHARE", customer_id)
            await self.lock_accounts(conn, [account_id], edges=True)
            current = await self._roles(conn, account_id)
            if customer_id not in current:
                raise NotFound("customer is not related to this account")
            if self._owners(current) == [customer_id]:
                raise FailedPrecondition("cannot unlink the only owner of an account")
            stale = await self.stale_keys_for_accounts(conn, [account_id])
            await conn.execute("DELETE FROM account_customers WHERE account_id = $1 AND customer_id = $2",
                               account_id, customer_id)
            return Change(pb.RelationshipResponse(account_id=account_id, customer_id=customer_id,
                                                  role=current[customer_id]),  # type: ignore[arg-type]
                          stale, "relationship.unlinked", "account", account_id, {"customer_id": customer_id})

        return await self._write("UnlinkCustomer", req, body, caller)

    # -- cards ---------------------------------------------------------------------------------
    async def issue_card(self, req: pb.IssueCardRequest, caller: Caller) -> WriteResult:
        pan = parse_pan(req.pan)
        expiry = parse_expiry(req.expiry)
        account_id = parse_account_id(req.account_id)
        version = self.keyring.fingerprint_version
        fp = self.keyring.fingerprint(pan)
        next_version = self.keyring.rotation_target
        next_fp = self.keyring.fingerprint(pan, next_version) if next_version else None

        async def body(conn: Conn) -> Change:
            await self._open_account(conn, account_id)
            token = new_id("tok_", 24)
            if await self._taken_under_any_version(conn, "card", pan):
                raise AlreadyExists(f"card {mask_pan(pan)} is already issued")
            try:
                row = required(await conn.fetchrow(
                    "INSERT INTO cards (token, fingerprint_version, pan_fingerprint, bin, last4, pan_length,"
                    " pan_ciphertext, dek_id, expiry, account_id, status, next_fingerprint_version,"
                    " next_pan_fingerprint, iin8) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) RETURNING *",
                    token, version, fp, pan[:6], pan[-4:], len(pan),
                    self.data_key.encrypt(pan, purpose=PAN_PURPOSE), self.data_key.dek_id, expiry, account_id,
                    pb.CARD_STATUS_ACTIVE, next_version, next_fp, pan[:8] if len(pan) >= 16 else None))
            except asyncpg.UniqueViolationError as exc:
                raise AlreadyExists(f"card {mask_pan(pan)} is already issued") from exc
            stale = [*self.every_version(ck.card_key, pan), ck.token_key(token)]
            stale += await self.stale_keys_for_accounts(conn, [account_id])
            return Change(card_msg(row), stale, "card.issued", "card", token,
                          {"account_id": account_id, "bin": pan[:6], "last4": pan[-4:]})

        return await self._write("IssueCard", req, body, caller)

    async def _change_card(self, rpc: str, req: Request, token: str, expected: int,
                           status: int | None, account_id: str | None, caller: Caller) -> WriteResult:
        parse_token(token)

        async def body(conn: Conn) -> Change:
            cur = await conn.fetchrow("SELECT * FROM cards WHERE token = $1 FOR UPDATE", token)
            if cur is None:
                raise NotFound("card not found")
            self._check_version("card", expected, cur["version"])
            if status is not None and (why := lifecycle.card_status_refused(cur["status"], status)):
                raise FailedPrecondition(why)
            if account_id is not None:
                if cur["status"] == pb.CARD_STATUS_CLOSED:
                    raise FailedPrecondition("card is closed")
                # The card leaves one account for another: both change (the new one must be open).
                await self.lock_accounts(conn, [cur["account_id"], account_id], edges=True)
                await self._open_account(conn, account_id)
            else:
                await self.lock_accounts(conn, [cur["account_id"]], edges=False)
                if status == pb.CARD_STATUS_ACTIVE and pb.ACCOUNT_STATUS_CLOSED == await conn.fetchval(
                        "SELECT status FROM accounts WHERE account_id = $1", cur["account_id"]):
                    raise FailedPrecondition("the card's account is closed: link the card to an open account first")
            row = required(await conn.fetchrow(
                "UPDATE cards SET status = coalesce($2, status), account_id = coalesce($3, account_id),"
                " version = version + 1, updated_at = now() WHERE token = $1 RETURNING *",
                token, status, account_id))
            stale = [ck.card_key(cur["fingerprint_version"], cur["pan_fingerprint"]), ck.token_key(token)]
            if cur["next_pan_fingerprint"] is not None:
                stale.append(ck.card_key(cur["next_fingerprint_version"], cur["next_pan_fingerprint"]))
            stale += await self.stale_keys_for_accounts(conn, [cur["account_id"], row["account_id"]])
            payload: dict[str, Any] = {"version": row["version"]}
            if status is not None:
                payload["status"] = status
            if account_id is not None:
                payload["account_id"] = account_id
            event = "card.status_changed" if status is not None else "card.linked"
            return Change(card_msg(row), stale, event, "card", token, payload)

        return await self._write(rpc, req, body, caller)

    async def link_card(self, req: pb.LinkCardRequest, caller: Caller) -> WriteResult:
        return await self._change_card("LinkCard", req, req.card_token, req.expected_version,
                                       None, parse_account_id(req.account_id), caller)

    async def set_card_status(self, req: pb.SetCardStatusRequest, caller: Caller) -> WriteResult:
        self._check_enum(pb.CardStatus, req.status, "status")
        return await self._change_card("SetCardStatus", req, req.card_token, req.expected_version,
                                       req.status, None, caller)
