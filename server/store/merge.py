"""Merge, unmerge and the review queue (docs/identity.md, "Merge and unmerge" and "Review queue").

A merge re-points, it never rewrites: the merged customer's source records and relationships move to
the survivor, the customers merged into it before (its aliases) are re-pointed to the survivor, and
the merged customer stays as an alias (customers.merged_into). One customer_merges row records
exactly what moved, so an unmerge moves back exactly that. Every write runs in the write envelope
(server/store/envelope.py) like any admin write; relationship moves become relationship feed events
(Change.also) so that a feed consumer's copy stays what the service holds.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from google.protobuf.message import Message

from server.caller import Caller
from server.errors import FailedPrecondition, InvalidKey, NotFound, WriteConflict
from server.pan import parse_customer_id
from server.proto import crs_pb2 as pb
from server.store import edges
from server.store.db import Conn, required, translate_db_errors
from server.store.envelope import Change, WriteResult
from server.store.identity_writes import IdentityWrites
from server.store.messages import customer_msg, review_status_word

OPEN, ACCEPTED, REJECTED = pb.REVIEW_STATUS_OPEN, pb.REVIEW_STATUS_ACCEPTED, pb.REVIEW_STATUS_REJECTED
# A review task naming customer $2 names $1 instead (a merge re-points to the survivor, an unmerge back).
_SWAP_CUSTOMER = ("UPDATE identity_reviews r SET customer_id = CASE customer_id WHEN $2 THEN $1 ELSE customer_id END,"
                  " candidate_id = CASE candidate_id WHEN $2 THEN $1 ELSE candidate_id END")
# The roles of customer $1 on accounts $2, one each from $3.
_SET_ROLES = ("UPDATE account_customers c SET role = n.role FROM unnest($2::text[], $3::smallint[])"
              " AS n(account_id, role) WHERE c.customer_id = $1 AND c.account_id = n.account_id")
DEFAULT_PAGE, MAX_PAGE = 100, 1000
_REVIEW_ID = re.compile(r"rev_[0-9a-z]{4,40}")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass
class Moved:
    """What a merge or an unmerge did, as the envelope's Change wants it."""

    answer: pb.Merge
    stale: list[str] = field(default_factory=list)
    also: list[tuple[str, Message]] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)


def _rel(account_id: str, customer_id: str, role: int) -> pb.Relationship:
    return pb.Relationship(account_id=account_id, customer_id=customer_id, role=role)  # type: ignore[arg-type]


def review_msg(row: asyncpg.Record) -> pb.ReviewTask:
    evidence = row["evidence"]
    if isinstance(evidence, str):
        evidence = orjson.loads(evidence)
    task = pb.ReviewTask(
        review_id=row["review_id"], customer_id=row["customer_id"], candidate_id=row["candidate_id"],
        probability=row["probability"], status=row["status"],
        evidence=[pb.AttributeEvidence(attribute=e["attribute"], level=e["level"], weight=e["weight"])
                  for e in evidence])
    task.created_at.FromDatetime(row["created_at"])
    if row["decided_at"] is not None:
        task.decided_at.FromDatetime(row["decided_at"])
    return task


def page_token(row: asyncpg.Record) -> str:
    micros = (row["created_at"] - _EPOCH) // dt.timedelta(microseconds=1)
    return base64.urlsafe_b64encode(orjson.dumps([micros, row["review_id"]])).decode().rstrip("=")


def parse_page_token(token: str) -> tuple[dt.datetime, str] | None:
    if not token:
        return None
    try:
        micros, review_id = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(micros, int) or not isinstance(review_id, str) or not _REVIEW_ID.fullmatch(review_id):
            raise ValueError(token)
        return _EPOCH + dt.timedelta(microseconds=micros), review_id
    except (ValueError, TypeError, OverflowError):
        raise InvalidKey("page_token is not one this service handed out") from None


def parse_review_id(value: str) -> str:
    if not _REVIEW_ID.fullmatch(value):
        raise InvalidKey("review_id is malformed (expected 'rev_' and letters or digits)")
    return value


def _customers_changed(moved: Moved, rows: list[asyncpg.Record]) -> list[str]:
    """Customers whose merged_into a merge or unmerge changed: each one's new state goes to the feed
    (a copy built from Watch then holds what a Snapshot holds). Their ids."""
    for row in rows:
        moved.also.append(("customer.updated", customer_msg(row)))
    return [row["customer_id"] for row in rows]


async def _survivor_changed(conn: Conn, moved: Moved, survivor: str) -> None:
    """A merge or unmerge changes the survivor's accounts and golden record: its version moves (a write
    prepared with the old expected_version is refused), and its state goes to the feed."""
    _customers_changed(moved, await conn.fetch(
        "UPDATE customers SET version = version + 1, updated_at = now() WHERE customer_id = $1 RETURNING *", survivor))


async def _lock_customers(conn: Conn, ids: list[str]) -> dict[str, asyncpg.Record]:
    """The customers' rows, locked in id order (two merges never wait on each other in a cycle)."""
    rows = await conn.fetch("SELECT customer_id, merged_into, status FROM customers WHERE customer_id = ANY($1::text[])"
                            " ORDER BY customer_id FOR UPDATE", ids)
    found = {r["customer_id"]: r for r in rows}
    for cid in ids:
        if cid not in found:
            raise NotFound(f"customer {cid} not found")
    return found


class IdentityStore(IdentityWrites):
    """IdentityWrites plus merge, unmerge and the review queue."""

    # -- merge -----------------------------------------------------------------------------------
    async def _merge(self, conn: Conn, survivor: str, merged: str) -> Moved:
        rows = await _lock_customers(conn, [survivor, merged])   # first: an unknown id is NOT_FOUND
        if survivor == merged:
            raise FailedPrecondition("a customer cannot be merged into itself")
        if rows[merged]["merged_into"]:
            raise FailedPrecondition(f"customer {merged} was already merged into {rows[merged]['merged_into']}")
        if rows[survivor]["merged_into"]:
            raise FailedPrecondition(f"survivor {survivor} was merged into {rows[survivor]['merged_into']}:"
                                     " merge into that one")
        statuses = rows[survivor]["status"], rows[merged]["status"]
        if statuses[0] != statuses[1]:
            # The survivor's status decides its cards' answers: a merge would lift the merged one's hold
            # (a SUSPENDED customer's cards approved), or put the survivor's on it. A person decides.
            names = " and ".join(pb.CustomerStatus.Name(x).removeprefix("CUSTOMER_STATUS_") for x in statuses)
            raise FailedPrecondition(f"the customers' statuses differ ({names}): give them the same status"
                                     " (SetCustomerStatus) before merging")
        moved = Moved(pb.Merge(winner_customer_id=survivor, loser_customer_id=merged))
        # The merged customer's accounts change customers: locked after the customers (docs/decisions.md,
        # "Lock order"). Its relationships cannot change meanwhile: that takes its row, locked above.
        # The survivor's own accounts too: its version moves, which their answers carry (one pass, id order).
        theirs_too = await self._accounts_of(conn, survivor)
        await self.lock_accounts(conn, [*await self._accounts_of(conn, merged), *theirs_too], edges=True)
        record_ids = [r["record_id"] for r in await conn.fetch(
            "UPDATE source_records SET customer_id = $1 WHERE customer_id = $2 RETURNING record_id", survivor, merged)]
        rels = await conn.fetch("SELECT account_id, role, created_at FROM account_customers WHERE customer_id = $1"
                                " ORDER BY account_id FOR UPDATE", merged)
        accounts = [r["account_id"] for r in rels]
        theirs = {r["account_id"]: r["role"] for r in await conn.fetch(
            "SELECT account_id, role FROM account_customers WHERE customer_id = $1 AND account_id = ANY($2::text[])"
            " FOR UPDATE", survivor, accounts)}
        recorded: list[dict[str, Any]] = []
        kept, stronger = [], []   # accounts both are on: the merged one's row goes; the survivor's role may rise
        for r in rels:
            account, role = r["account_id"], r["role"]
            before = theirs.get(account)
            recorded.append({"account_id": account, "role": role, "survivor_role": before,
                             "created_at": r["created_at"].isoformat()})
            moved.also.append(("relationship.unlinked", _rel(account, merged, role)))
            if before is None:   # the row moves as it is (its created_at, hence the answers' order, too)
                moved.also.append(("relationship.linked", _rel(account, survivor, role)))
                continue
            # Both on one account: one row for the survivor with the stronger role (lower number).
            kept.append(account)
            if role < before:
                stronger.append((account, role))
                moved.also.append(("relationship.role_changed", _rel(account, survivor, role)))
        # A statement for each kind of change, whatever the number of accounts: a statement a relationship
        # took a 24,000-account customer's merge 15 s (docs/audit-2026-12-04.md, "Twentieth audit").
        await conn.execute("DELETE FROM account_customers WHERE customer_id = $1 AND account_id = ANY($2::text[])",
                           merged, kept)
        await conn.execute("UPDATE account_customers SET customer_id = $1 WHERE customer_id = $2"
                           " AND account_id = ANY($3::text[])", survivor, merged, accounts)   # the rows recorded
        await conn.execute(_SET_ROLES, survivor, [a for a, _ in stronger], [role for _, role in stronger])
        aliases = _customers_changed(moved, await conn.fetch(
            "UPDATE customers SET merged_into = $1, version = version + 1, updated_at = now() WHERE merged_into = $2"
            " RETURNING *", survivor, merged))
        _customers_changed(moved, await conn.fetch(
            "UPDATE customers SET merged_into = $1, merged_at = now(), version = version + 1, updated_at = now()"
            " WHERE customer_id = $2 RETURNING *", survivor, merged))
        await _survivor_changed(conn, moved, survivor)
        reviews, repointed = await self._repoint_reviews(conn, survivor, merged)
        await conn.execute(
            "INSERT INTO customer_merges (survivor_id, merged_id, record_ids, relationships, aliases, reviews)"
            " VALUES ($1, $2, $3, $4::jsonb, $5, $6)", survivor, merged, record_ids, orjson.dumps(recorded).decode(),
            sorted(aliases), repointed)
        moved.stale = await self.stale_keys_for_accounts(conn, accounts)
        moved.stale += await self.customer_keys(conn, [survivor, merged, *aliases])
        moved.stale += await edges.stale_keys_for_customers(conn, [survivor])   # its version moved
        moved.payload = {"customer_id": survivor, "records": len(record_ids), "relationships": len(recorded),
                         "conflicts": sum(1 for r in recorded if r["survivor_role"] is not None),
                         "aliases": sorted(aliases), "reviews": reviews}
        return moved

    @staticmethod
    async def _repoint_reviews(conn: Conn, survivor: str, merged: str) -> tuple[dict[str, int], list[str]]:
        """Open reviews naming the merged customer: the pair itself is decided (ACCEPTED); one with a
        third customer names the survivor instead (their ids returned, for an unmerge), unless the
        survivor already has an open review with that customer or a person said they are two people
        (then it goes: it asks nothing new)."""
        status = await conn.execute(
            "UPDATE identity_reviews SET status = $3, decided_at = now() WHERE status = $4"
            " AND ((customer_id = $1 AND candidate_id = $2) OR (customer_id = $2 AND candidate_id = $1))",
            survivor, merged, ACCEPTED, OPEN)
        closed, repointed, dropped = int(status.split()[-1]), [], 0
        for r in await conn.fetch("SELECT review_id, customer_id, candidate_id FROM identity_reviews"
                                  " WHERE status = $2 AND $1 IN (customer_id, candidate_id) ORDER BY review_id"
                                  " FOR UPDATE", merged, OPEN):
            other = r["candidate_id"] if r["customer_id"] == merged else r["customer_id"]
            taken = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM identity_reviews WHERE status = $3 AND LEAST(customer_id, candidate_id)"
                " = LEAST($1, $2) AND GREATEST(customer_id, candidate_id) = GREATEST($1, $2))"
                " OR EXISTS (SELECT 1 FROM identity_distinct WHERE customer_a = LEAST($1, $2)"
                " AND customer_b = GREATEST($1, $2))", survivor, other, OPEN)
            if taken:
                await conn.execute("DELETE FROM identity_reviews WHERE review_id = $1", r["review_id"])
                dropped += 1
            else:
                await conn.execute(_SWAP_CUSTOMER + " WHERE review_id = $3", survivor, merged, r["review_id"])
                repointed.append(r["review_id"])
        return {"accepted": closed, "repointed": len(repointed), "dropped": dropped}, repointed

    async def merge_customers(self, req: pb.MergeCustomersRequest, caller: Caller) -> WriteResult:
        survivor = parse_customer_id(req.survivor_id, "survivor_id")
        merged = parse_customer_id(req.merged_id, "merged_id")

        async def body(conn: Conn) -> Change:
            moved = await self._merge(conn, survivor, merged)
            return Change(moved.answer, moved.stale, "customer.merged", "customer", merged, moved.payload,
                          also=tuple(moved.also))

        return await self._write("MergeCustomers", req, body, caller)

    # -- unmerge ---------------------------------------------------------------------------------
    @staticmethod
    async def _no_later_merge_on_its_accounts(conn: Conn, m: Any) -> None:
        """Merges into one survivor are undone last first where they share an account: a later merge
        may have changed the survivor's row there (its role, or deleted the merged one's), and undoing
        the earlier one first would carry that row away (an account left without its owner)."""
        later = await conn.fetchval(
            "SELECT l.merged_id FROM customer_merges e JOIN customer_merges l ON l.survivor_id = e.survivor_id"
            " AND l.merge_id > e.merge_id AND l.unmerged_at IS NULL WHERE e.merge_id = $1"
            " AND EXISTS (SELECT 1 FROM jsonb_array_elements(l.relationships) r,"
            " jsonb_array_elements(e.relationships) o WHERE r->>'account_id' = o->>'account_id')"
            " ORDER BY l.merge_id DESC LIMIT 1", m["merge_id"])
        if later is not None:
            raise FailedPrecondition(f"customer {later} was merged into {m['survivor_id']} after"
                                     f" {m['merged_id']}, on an account they share: unmerge {later} first")

    async def _unmerge(self, conn: Conn, merged: str) -> Moved:
        m = await conn.fetchrow("SELECT * FROM customer_merges WHERE merged_id = $1 AND unmerged_at IS NULL",
                                merged)
        survivor = m["survivor_id"] if m is not None else None
        rows = await _lock_customers(conn, sorted({merged, survivor or merged}))
        now_into = rows[merged]["merged_into"]
        if m is None or not now_into:
            raise FailedPrecondition(f"customer {merged} is not merged")
        assert survivor is not None
        if now_into != survivor:
            raise FailedPrecondition(f"customer {merged} was merged into {survivor}, which was merged into"
                                     f" {now_into} since: unmerge {survivor} first")
        # Read before the locks: unmerged and merged again meanwhile, it is another merge now.
        if await conn.fetchval("SELECT merge_id FROM customer_merges WHERE merged_id = $1 AND unmerged_at IS NULL",
                               merged) != m["merge_id"]:
            raise WriteConflict(f"customer {merged} was unmerged and merged again meanwhile: retry")
        await self._no_later_merge_on_its_accounts(conn, m)
        moved = Moved(pb.Merge(winner_customer_id=survivor, loser_customer_id=merged, unmerge=True))
        records = await conn.fetch("UPDATE source_records SET customer_id = $1 WHERE record_id = ANY($2::bigint[])"
                                   " AND customer_id = $3 RETURNING record_id", merged, m["record_ids"], survivor)
        recorded = m["relationships"]
        if isinstance(recorded, str):
            recorded = orjson.loads(recorded)
        await self.lock_accounts(conn, [*(rel["account_id"] for rel in recorded),
                                        *await self._accounts_of(conn, survivor)], edges=True)
        now_roles = {r["account_id"]: r["role"] for r in await conn.fetch(
            "SELECT account_id, role FROM account_customers WHERE customer_id = $1 AND account_id = ANY($2::text[])"
            " ORDER BY account_id FOR UPDATE", survivor, [rel["account_id"] for rel in recorded])}
        skipped: list[str] = []
        back, again, weaker = [], [], []   # rows that move back; rows made again; the survivor's roles restored
        for rel in recorded:
            account, role, before = rel["account_id"], rel["role"], rel["survivor_role"]
            now = now_roles.get(account)
            if now is None:   # unlinked since the merge: nothing to give back
                skipped.append(account)
                continue
            if before is None:
                back.append((account, role))
                moved.also.append(("relationship.unlinked", _rel(account, survivor, now)))
            else:
                again.append((account, role, dt.datetime.fromisoformat(rel["created_at"])))
                if now != before:
                    weaker.append((account, before))
                    moved.also.append(("relationship.role_changed", _rel(account, survivor, before)))
            moved.also.append(("relationship.linked", _rel(account, merged, role)))
        # A statement for each kind of change, whatever the number of accounts (as the merge).
        await conn.execute(
            "UPDATE account_customers c SET customer_id = $2, role = n.role FROM unnest($3::text[], $4::smallint[])"
            " AS n(account_id, role) WHERE c.customer_id = $1 AND c.account_id = n.account_id",
            survivor, merged, [a for a, _ in back], [role for _, role in back])
        await conn.execute(
            "INSERT INTO account_customers (account_id, customer_id, role, created_at)"
            " SELECT account_id, $1, role, created_at FROM unnest($2::text[], $3::smallint[], $4::timestamptz[])"
            " AS n(account_id, role, created_at)",
            merged, [a for a, _, _ in again], [role for _, role, _ in again], [at for _, _, at in again])
        await conn.execute(_SET_ROLES, survivor, [a for a, _ in weaker], [role for _, role in weaker])
        moved.answer.skipped_account_ids.extend(skipped)
        aliases = _customers_changed(moved, await conn.fetch(
            "UPDATE customers SET merged_into = $1, version = version + 1, updated_at = now()"
            " WHERE customer_id = ANY($2::text[]) AND merged_into = $3 RETURNING *", merged, m["aliases"], survivor))
        _customers_changed(moved, await conn.fetch(
            "UPDATE customers SET merged_into = NULL, merged_at = NULL, version = version + 1, updated_at = now()"
            " WHERE customer_id = $1 RETURNING *", merged))
        await _survivor_changed(conn, moved, survivor)
        await conn.execute("UPDATE customer_merges SET unmerged_at = now() WHERE merge_id = $1", m["merge_id"])
        # The merge's re-pointed review tasks, still open on the survivor, ask about the merged customer again.
        # (Unless the merged customer has an open task with that customer already: one per pair.)
        await conn.execute(
            _SWAP_CUSTOMER + " WHERE review_id = ANY($3::text[]) AND status = $4 AND $2 IN (customer_id, candidate_id)"
            " AND NOT EXISTS (SELECT 1 FROM identity_reviews o WHERE o.status = $4 AND $1 IN (o.customer_id,"
            " o.candidate_id) AND (CASE r.customer_id WHEN $2 THEN r.candidate_id ELSE r.customer_id END)"
            " IN (o.customer_id, o.candidate_id))", merged, survivor, m["reviews"], OPEN)
        moved.stale = await self.stale_keys_for_accounts(conn, [r["account_id"] for r in recorded])
        moved.stale += await self.customer_keys(conn, [survivor, merged, *aliases])
        moved.stale += await edges.stale_keys_for_customers(conn, [survivor])   # its version moved
        moved.payload = {"customer_id": survivor, "records": len(records),
                         "relationships": len(recorded) - len(skipped),
                         "skipped_accounts": skipped, "aliases": sorted(aliases)}
        return moved

    async def unmerge_customer(self, req: pb.UnmergeCustomerRequest, caller: Caller) -> WriteResult:
        merged = parse_customer_id(req.merged_id, "merged_id")

        async def body(conn: Conn) -> Change:
            moved = await self._unmerge(conn, merged)
            return Change(moved.answer, moved.stale, "customer.unmerged", "customer", merged, moved.payload,
                          also=tuple(moved.also))

        return await self._write("UnmergeCustomer", req, body, caller)

    # -- the review queue ------------------------------------------------------------------------
    async def list_reviews(self, req: pb.ListReviewTasksRequest) -> pb.ListReviewTasksResponse:
        status = req.status or OPEN
        if status not in pb.ReviewStatus.values():
            raise InvalidKey("status must be one of " + ", ".join(pb.ReviewStatus.keys()[1:]))
        size = req.page_size or DEFAULT_PAGE
        if not 1 <= size <= MAX_PAGE:
            raise InvalidKey(f"page_size must be 0-{MAX_PAGE} (0 = {DEFAULT_PAGE})")
        after = parse_page_token(req.page_token)
        with translate_db_errors():
            # A later page seeks past the last one's (created_at, review_id), not "$2 IS NULL OR ...": the OR
            # kept the index scan from starting there, and it read every task of the pages before.
            rows = await (self.pool.fetch(
                "SELECT * FROM identity_reviews WHERE status = $1 AND (created_at, review_id) > ($2, $3)"
                " ORDER BY created_at, review_id LIMIT $4", status, after[0], after[1], size + 1, timeout=self.timeout)
                if after else self.pool.fetch(
                "SELECT * FROM identity_reviews WHERE status = $1 ORDER BY created_at, review_id LIMIT $2", status,
                size + 1, timeout=self.timeout))
        answer = pb.ListReviewTasksResponse(tasks=[review_msg(r) for r in rows[:size]])
        if len(rows) > size:
            answer.next_page_token = page_token(rows[size - 1])
        return answer

    @staticmethod
    async def _lock_review(conn: Conn, review_id: str) -> asyncpg.Record:
        """The review task, locked after its two customers: a merge locks customers, then re-points
        their reviews, so taking the task first could wait on a merge in a cycle. A merge that
        committed meanwhile may have re-pointed the task to other customers: lock those, again."""
        for _ in range(3):
            pair = await conn.fetchrow("SELECT customer_id, candidate_id FROM identity_reviews WHERE review_id = $1",
                                       review_id)
            if pair is None:
                raise NotFound("review task not found")
            await _lock_customers(conn, sorted({pair["customer_id"], pair["candidate_id"]}))
            task = await conn.fetchrow("SELECT * FROM identity_reviews WHERE review_id = $1 FOR UPDATE", review_id)
            if task is None:
                raise NotFound("review task not found")
            if (task["customer_id"], task["candidate_id"]) == (pair["customer_id"], pair["candidate_id"]):
                return required(task)
        raise WriteConflict("the review task kept changing under concurrent merges: retry")

    async def decide_review(self, req: pb.DecideReviewTaskRequest, caller: Caller) -> WriteResult:
        review_id = parse_review_id(req.review_id)

        async def body(conn: Conn) -> Change:
            task = await self._lock_review(conn, review_id)
            if task["status"] != OPEN:
                raise FailedPrecondition(f"review task is already {review_status_word(task['status'])}")
            customer, candidate = task["customer_id"], task["candidate_id"]
            if req.accept:
                # The newer customer joins the older, which survives: the task's candidate_id, but for a task a
                # merge re-pointed to its survivor, which may be the older of the two.
                older = await conn.fetchval("SELECT customer_id FROM customers WHERE customer_id = ANY($1::text[])"
                                            " ORDER BY created_at, customer_id = $2 DESC LIMIT 1",
                                            [customer, candidate], candidate)
                survivor, merged = (candidate, customer) if older == candidate else (customer, candidate)
                moved = await self._merge(conn, survivor, merged)   # also marks this task ACCEPTED
                row = required(await conn.fetchrow("SELECT * FROM identity_reviews WHERE review_id = $1", review_id))
                return Change(review_msg(row), moved.stale, "customer.merged", "customer", merged,
                              moved.payload | {"review_id": review_id}, also=tuple(moved.also),
                              feed_state=moved.answer)
            row = required(await conn.fetchrow(
                "UPDATE identity_reviews SET status = $2, decided_at = now() WHERE review_id = $1 RETURNING *",
                review_id, REJECTED))
            await conn.execute("INSERT INTO identity_distinct (customer_a, customer_b) VALUES (LEAST($1, $2),"
                               " GREATEST($1, $2)) ON CONFLICT DO NOTHING", customer, candidate)
            # Nothing a lookup answers changed; the feed gets the customer as it is (a no-op update).
            state = required(await conn.fetchrow("SELECT * FROM customers WHERE customer_id = $1", customer))
            return Change(review_msg(row), [], "customer.review_rejected", "customer", customer,
                          {"customer_id": candidate, "review_id": review_id}, feed_state=customer_msg(state))

        return await self._write("DecideReviewTask", req, body, caller)
