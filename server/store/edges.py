"""What a write's stale cache keys are found through: an account's cards and customers, and the
locks that keep those edges still until the write commits (docs/decisions.md, "Lock order")."""

from __future__ import annotations

from collections.abc import Iterable

from server import cache_keys as ck
from server.store.db import Conn


async def stale_keys_for_accounts(conn: Conn, account_ids: Iterable[str]) -> list[str]:
    """Every cached answer that embeds one of these accounts: the account, its cards (by PAN
    fingerprint and by token) and the profiles of its customers."""
    return [key for keys in (await stale_keys_by_account(conn, account_ids)).values() for key in keys]


async def stale_keys_by_account(conn: Conn, account_ids: Iterable[str]) -> dict[str, list[str]]:
    """stale_keys_for_accounts, account by account, in one query."""
    ids = [a for a in set(account_ids) if a]
    if not ids:
        return {}
    # Both fingerprint versions during a key rotation: answers may be cached under either.
    rows = await conn.fetch(
        "SELECT account_id AS acc, 'a' AS kind, fingerprint_version AS v, account_fingerprint AS fp, NULL AS ref"
        " FROM accounts WHERE account_id = ANY($1::text[])"
        " UNION ALL SELECT account_id, 'a', next_fingerprint_version, next_account_fingerprint, NULL FROM accounts"
        " WHERE account_id = ANY($1::text[]) AND next_account_fingerprint IS NOT NULL"
        " UNION ALL SELECT account_id, 'c', fingerprint_version, pan_fingerprint, token FROM cards"
        " WHERE account_id = ANY($1::text[])"
        " UNION ALL SELECT account_id, 'c', next_fingerprint_version, next_pan_fingerprint, token FROM cards"
        " WHERE account_id = ANY($1::text[]) AND next_pan_fingerprint IS NOT NULL"
        " UNION ALL SELECT account_id, 'u', NULL, NULL, customer_id FROM account_customers"
        " WHERE account_id = ANY($1::text[])"
        # A merged customer's id (an alias) answers its survivor's profile: cached under the alias.
        " UNION ALL SELECT ac.account_id, 'u', NULL, NULL, m.customer_id FROM account_customers ac"
        " JOIN customers m ON m.merged_into = ac.customer_id WHERE ac.account_id = ANY($1::text[])", ids)
    out: dict[str, list[str]] = {a: [] for a in ids}
    for r in rows:
        keys = out[r["acc"]]
        if r["kind"] == "a":
            keys.append(ck.account_key(r["v"], r["fp"]))
        elif r["kind"] == "c":
            keys += [ck.card_key(r["v"], r["fp"]), ck.token_key(r["ref"])]
        else:
            keys.append(ck.customer_key(r["ref"]))
    return out


async def lock_accounts(conn: Conn, account_ids: Iterable[str], *, edges: bool) -> None:
    """Lock accounts' rows, in id order (see "Lock order" in docs/decisions.md). `edges`: this write
    adds or removes one of their cards or customers (FOR NO KEY UPDATE); otherwise its stale keys
    were found through their cards and customers, which must stay as they are until it commits
    (FOR SHARE): a card issued meanwhile would otherwise keep an answer it never invalidates."""
    ids = sorted({a for a in account_ids if a})
    if ids:
        await conn.execute("SELECT 1 FROM accounts WHERE account_id = ANY($1::text[]) ORDER BY account_id"
                           f" FOR {'NO KEY UPDATE' if edges else 'SHARE'}", ids)


async def stale_keys_for_customers(conn: Conn, customer_ids: Iterable[str]) -> list[str]:
    """Every cached answer that embeds one of these customers (its version too, which a caller sends
    back as expected_version): their profiles and their aliases', and every answer of each account they
    are related to. Call it with the customers' rows locked or updated (their relationships then stay
    as they are until commit); their accounts are locked FOR SHARE here, after them (the lock order),
    so that no card is issued on one unseen."""
    return [key for keys in (await stale_keys_by_customer(conn, customer_ids)).values() for key in keys]


async def stale_keys_by_customer(conn: Conn, customer_ids: Iterable[str]) -> dict[str, list[str]]:
    """stale_keys_for_customers, customer by customer, in three queries however many (a bulk import's)."""
    ids = sorted({c for c in customer_ids if c})
    if not ids:
        return {}
    rows = await conn.fetch(
        "SELECT merged_into AS cid, customer_id AS ref, true AS alias FROM customers"
        " WHERE merged_into = ANY($1::text[])"
        " UNION ALL SELECT customer_id, account_id, false FROM account_customers WHERE customer_id = ANY($1::text[])",
        ids)
    await lock_accounts(conn, [r["ref"] for r in rows if not r["alias"]], edges=False)
    by_account = await stale_keys_by_account(conn, [r["ref"] for r in rows if not r["alias"]])
    out: dict[str, list[str]] = {c: [ck.customer_key(c)] for c in ids}
    for r in rows:
        out[r["cid"]] += [ck.customer_key(r["ref"])] if r["alias"] else by_account[r["ref"]]
    return out
