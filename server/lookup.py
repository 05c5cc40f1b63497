"""LookupService handlers: validate, turn the key into a cache key + loader, resolve, answer bytes.

The whole hot path of a card lookup, in order: parse request (protobuf) → parse_pan (length,
ASCII digits, Luhn) → HMAC fingerprint → Resolver.resolve (L1 → L2 → L3) → the cached bytes go back
through an identity serializer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from google.protobuf.message import Message

from server import cache_keys as ck
from server import decisions
from server.bin_source import BinTableHolder
from server.bins import MIN_PREFIX, PREFIX_DIGITS, BinTable
from server.caller import KEY_SCOPE, Caller
from server.crypto import Keyring, account_fingerprint_input
from server.decisions import DecisionTable
from server.encoding import CUSTOMER_FIELD, RESOLUTION_FIELD, batch_response, lookup_result
from server.errors import (
    BackendUnavailable,
    CrsError,
    FailedPrecondition,
    InvalidKey,
    NotFound,
    PermissionDenied,
    rpc_code_number,
)
from server.lookup_stream import stream_resolve
from server.pan import (
    PAN_MAX_LEN,
    PAN_MIN_LEN,
    parse_account_number,
    parse_customer_id,
    parse_pan,
    parse_routing_number,
    parse_token,
    routing_number_ok,
)
from server.proto import crs_pb2 as pb
from server.resolver import Lookup, Resolver
from server.store import reads
from server.store.read_route import Read as ReadQuery
from server.store.read_route import Uncacheable

MAX_CORRELATION_ID = 128
Read = Callable[..., Awaitable[bytes | Uncacheable | None]]
STREAM_WINDOW = 128   # concurrent misses per stream; a bounded queue of work per caller
Later = Callable[[], Awaitable[bytes]]   # the part of a call that needs I/O, awaited on the event loop


async def finish(now: bytes | Later) -> bytes:
    return now if isinstance(now, bytes) else await now()


class Partial:
    """A `Later` that can also be answered without its I/O (a batch's misses): `refused(exc)` answers
    now, each key still to look up answering `exc` (server/hybrid.py, when the loop is full)."""

    __slots__ = ("later", "refused")

    def __init__(self, later: Later, refused: Callable[[CrsError], bytes]) -> None:
        self.later, self.refused = later, refused

    def __call__(self) -> Awaitable[bytes]:
        return self.later()


class LookupHandlers:
    def __init__(self, *, resolver: Resolver, keyring: Keyring, pg_timeout: float,
                 batch_max: int, bins: BinTableHolder, decisions: DecisionTable, card_answer_life: float,
                 stream_window: int = STREAM_WINDOW) -> None:
        self.resolver = resolver
        self.card_answer_life = card_answer_life   # none is cached this close to its expiry (reads._card_answer)
        self.bins = bins
        self.decisions = decisions
        self.hints = reads.Hints(decisions, self._network_of)   # account answers (no network in their hints)
        self.keyring = keyring
        self.pg_timeout = pg_timeout
        self.batch_max = batch_max
        self.stream_window = stream_window
        current = keyring.fingerprint_version
        self._other_versions = sorted((v for v in keyring.fingerprint_keys if v != current), reverse=True)
        # (BIN table, card key prefix, decision hints) of one table, swapped whole (_card_table)
        self._card_tables: tuple[BinTable | None, str, reads.Hints] = (None, "", self.hints)
        self._card_hits = resolver.near.enabled      # without a near-cache, card_hit could only miss
        # Charges a caller's rate limit (Authenticator.admit): the Gate charges each call one but a
        # batch, which pays one per key here; a stream pays for each key too (docs/security.md).
        self.charge: Callable[[Caller, int], None] = lambda caller, cost: None

    def _card_table(self) -> tuple[BinTable | None, str, reads.Hints]:
        """The BIN table a card lookup uses, its card key prefix, and decision hints that take the card's
        network from that same table: card keys name the table version their answers are built with
        (server/cache_keys.py), so an answer loaded while the node swaps tables is built with the table
        its key names (it took the network from the new one: a rollback then served its decisions for the
        TTL). One tuple, swapped whole: a gRPC thread never pairs a prefix with another table."""
        current = self._card_tables
        table = self.bins.table
        if current[0] is not table:
            current = self._card_tables = (table, ck.card_key_prefix(self.keyring.fingerprint_version, table.version),
                                           reads.Hints(self.decisions, table.network_covering))
        return current

    # -- key → Lookup ----------------------------------------------------------------------------
    def card_by_pan(self, pan: str) -> Lookup:
        parse_pan(pan)
        version = self.keyring.fingerprint_version
        fp = self.keyring.fingerprint(pan)
        _, prefix, hints = self._card_table()
        load: ReadQuery = partial(reads.card_by_fingerprint, version=version, fingerprint=fp, timeout=self.pg_timeout,
                                  hints=hints, cached_for=self.card_answer_life)
        if self._other_versions:
            load = partial(self._any_version, "card", partial(reads.card_by_fingerprint,
                                                              cached_for=self.card_answer_life), pan, load, hints)
        return Lookup(prefix + fp.hex(), self.bins.cacheable(load), "card")

    def card_hit(self, pan: str) -> bytes | None:
        """A PAN's card from the near-cache by its cache key alone (no Lookup, no loader built), not
        counted; None for a miss or a negative entry: the caller takes the general path. No Luhn or
        digits check: a card key is only made from a PAN that passed parse_pan (card_by_pan), so one
        that fails it finds nothing here and is refused on the general path. Length and ASCII come
        first, to bound the hashing (docs/decisions.md, "The hit's fast path")."""
        if not (self._card_hits and PAN_MIN_LEN <= len(pan) <= PAN_MAX_LEN and pan.isascii()):
            return None
        cached, due = self.resolver.near.read(self._card_table()[1] + self.keyring.fingerprint(pan).hex())
        if due:     # only this reader is told (NearCache.read): the reload must start here
            self.resolver.refresh_soon(self.card_by_pan(pan))
        return cached if cached is not None and cached != ck.NEGATIVE else None

    def card_by_token(self, token: str) -> Lookup:
        parse_token(token)
        table, _, hints = self._card_table()
        assert table is not None
        return Lookup(ck.token_key(token, table.version), self.bins.cacheable(partial(
            reads.card_by_token, token=token, timeout=self.pg_timeout, hints=hints,
            cached_for=self.card_answer_life)), "card")

    def account(self, routing_number: str, account_number: str) -> Lookup:
        parse_routing_number(routing_number)
        parse_account_number(account_number)
        version = self.keyring.fingerprint_version
        value = account_fingerprint_input(routing_number, account_number)
        fp = self.keyring.fingerprint(value)
        load: ReadQuery = partial(reads.account_by_fingerprint, version=version, fingerprint=fp,
                                  timeout=self.pg_timeout, hints=self.hints)
        if self._other_versions:
            load = partial(self._any_version, "account", reads.account_by_fingerprint, value, load, self.hints)
        return Lookup(ck.account_key(version, fp), load, "account")

    async def _any_version(self, kind: str, read: Read, value: str, current: ReadQuery, hints: reads.Hints,
                           conn: Any) -> bytes | Uncacheable | None:
        """During a fingerprint-key rotation a row may carry only another configured version yet:
        a miss under the current version tries the others before answering NOT_FOUND. What is
        found that way is answered but not cached: a write invalidates a row's keys under the
        versions stored on it, so an answer cached under this node's version would outlive the
        row's next change (a card reported lost answering "approve" for the cache TTL)."""
        found = await current(conn)
        if found is not None:
            return found
        for version in self._other_versions:
            other = await read(conn, version, self.keyring.fingerprint(value, version), timeout=self.pg_timeout,
                               hints=hints)
            if other is not None:
                self.resolver.metrics.other_key_version.labels(kind).inc()
                return other if isinstance(other, Uncacheable) else Uncacheable(other)
        return None

    def customer(self, customer_id: str) -> Lookup:
        parse_customer_id(customer_id)
        return Lookup(ck.customer_key(customer_id),
                      partial(reads.customer_profile, customer_id=customer_id, timeout=self.pg_timeout), "customer")

    def for_key(self, key: pb.LookupKey, caller: Caller) -> tuple[Lookup, int]:
        which = key.WhichOneof("key")
        if which is not None and not caller.may(KEY_SCOPE[which]):
            raise PermissionDenied(f"client {caller.client_id!r} may not look up {which.replace('_', ' ')} keys")
        if which == "pan":
            return self.card_by_pan(key.pan), RESOLUTION_FIELD
        if which == "card_token":
            return self.card_by_token(key.card_token), RESOLUTION_FIELD
        if which == "account":
            return self.account(key.account.routing_number, key.account.account_number), RESOLUTION_FIELD
        if which == "customer_id":
            return self.customer(key.customer_id), CUSTOMER_FIELD
        raise InvalidKey("key is empty: set one of pan, card_token, account, customer_id")

    # -- answers that did not resolve: decision hints and the BIN range --------------------------
    def _network_of(self, iin: str) -> str:
        """The network of a card known by its first 6 or 8 digits ("" where the table splits them)."""
        return self.bins.table.network_covering(iin)

    def card_failure(self, exc: CrsError, pan: str | None) -> CrsError:
        """A card key's error with its decision hint (ErrorInfo) and, for a PAN that is not ours, its
        issuer range (BinRange) as status details."""
        hint = decisions.card_error(exc.code.name)
        details: list[Message] = [hint.error_info()] if hint else []
        message = exc.message
        if pan is not None and isinstance(exc, NotFound):
            table = self.bins.table
            row = table.lookup(pan)
            if row is not None:
                message = f"{exc.message}; BIN range {row.low}-{row.high} ({row.network}, {row.issuer_country})"
                details.append(row.message(table.version))
        return type(exc)(message, details=tuple(details)) if details else exc

    @staticmethod
    def account_failure(exc: CrsError, routing_number: str) -> CrsError:
        hint = decisions.account_error(exc.code.name, routing_ok=routing_number_ok(routing_number))
        return type(exc)(exc.message, details=(hint.error_info(),)) if hint else exc

    def failure_extras(self, key: pb.LookupKey, outcome: CrsError) -> tuple[bytes | None, bytes | None]:
        """(LookupResult.bin_range, LookupResult.decision) for a key that did not resolve."""
        which = key.WhichOneof("key")
        code = outcome.code.name
        if which in ("pan", "card_token"):
            hint = decisions.card_error(code)
            bin_range = self.bins.table.message_bytes(key.pan) if which == "pan" and code == "NOT_FOUND" else None
        elif which == "account":
            ok = routing_number_ok(key.account.routing_number)
            hint, bin_range = decisions.account_error(code, routing_ok=ok), None
        else:
            return None, None
        return bin_range, hint.message().SerializeToString() if hint else None

    # -- unary RPCs ------------------------------------------------------------------------------
    # Each RPC is split in two: `*_now` does the work that needs no I/O (validate, fingerprint, the
    # near-cache) and returns the answer, or `Later`: the rest, to await on the event loop. grpc.aio
    # runs both halves on the loop; the hybrid serving model runs `*_now` on a gRPC thread and hands
    # only `Later` to the loop (server/hybrid.py). One code path, so both models answer alike.
    def inline_paths(self) -> dict[str, Callable[[Any, Caller], bytes | Later]]:
        return {"ResolveCard": self.resolve_card_now, "ResolveAccount": self.resolve_account_now,
                "GetCustomer": self.get_customer_now, "ResolveBin": self.resolve_bin_now,
                "BatchResolve": self.batch_resolve_now}

    def resolve_card_now(self, request: pb.ResolveCardRequest, caller: Caller) -> bytes | Later:
        which = request.WhichOneof("key")
        pan = request.pan if which == "pan" else None
        if pan is not None and (cached := self.card_hit(pan)) is not None:
            self.resolver.metrics.tier_hit("l1")
            return cached
        try:
            if which == "pan":
                lookup = self.card_by_pan(request.pan)
            elif which == "token":
                lookup = self.card_by_token(request.token)
            else:
                raise InvalidKey("key is empty: set pan or token")
        except CrsError as exc:
            raise self.card_failure(exc, pan) from None
        return self._now_or_later(lookup, partial(self.card_failure, pan=pan))

    def resolve_account_now(self, request: pb.ResolveAccountRequest, caller: Caller) -> bytes | Later:
        fail = partial(self.account_failure, routing_number=request.routing_number)
        try:
            lookup = self.account(request.routing_number, request.account_number)
        except CrsError as exc:
            raise fail(exc) from None
        return self._now_or_later(lookup, fail)

    def _now_or_later(self, lookup: Lookup, fail: Callable[[CrsError], CrsError]) -> bytes | Later:
        """The answer now (the near-cache; hybrid: also a Redis hit read on this gRPC thread), or the
        resolve to await on the loop; errors go through `fail`."""
        try:
            now = self.resolver.now(lookup)
        except CrsError as exc:
            raise fail(exc) from None
        if isinstance(now, bytes):
            return now

        async def later() -> bytes:
            try:
                return await self.resolver.resolve(lookup, now)
            except CrsError as exc:
                raise fail(exc) from None

        return later

    def get_customer_now(self, request: pb.GetCustomerRequest, caller: Caller) -> bytes | Later:
        lookup = self.customer(request.customer_id)
        now = self.resolver.now(lookup)
        return now if isinstance(now, bytes) else partial(self.resolver.resolve, lookup, now)

    async def ResolveCard(self, request: pb.ResolveCardRequest, caller: Caller) -> bytes:
        return await finish(self.resolve_card_now(request, caller))

    async def ResolveAccount(self, request: pb.ResolveAccountRequest, caller: Caller) -> bytes:
        return await finish(self.resolve_account_now(request, caller))

    async def GetCustomer(self, request: pb.GetCustomerRequest, caller: Caller) -> bytes:
        return await finish(self.get_customer_now(request, caller))

    async def ResolveBin(self, request: pb.ResolveBinRequest, caller: Caller) -> bytes:
        return self.resolve_bin_now(request, caller)

    def resolve_bin_now(self, request: pb.ResolveBinRequest, caller: Caller) -> bytes:
        which = request.WhichOneof("key")
        if which == "pan":
            digits = parse_pan(request.pan)
        elif which == "prefix":
            digits = request.prefix
            if not (digits.isascii() and digits.isdigit() and MIN_PREFIX <= len(digits) <= PREFIX_DIGITS):
                raise InvalidKey(f"prefix must be {MIN_PREFIX}-{PREFIX_DIGITS} ASCII digits")
        else:
            raise InvalidKey("key is empty: set pan or prefix")
        table = self.bins.table
        row = table.lookup(digits) if which == "pan" else table.covering(digits)
        if row is None:
            if which == "prefix" and table.touches(digits):
                # Answering the range of the prefix's first number sent a whole BIN to its first sub-range.
                raise FailedPrecondition("the card numbers that start with this prefix are in more than one BIN"
                                         " range (or partly in none): look up more digits, or the card number")
            if not table.version and not self.bins.known:   # a switch takes NOT_FOUND as final
                raise BackendUnavailable("the BIN table has not been loaded yet (the database is unreachable); retry")
            raise NotFound("no BIN range holds this number" if table.version else "no BIN table is active")
        return row.message(table.version).SerializeToString()

    # -- many keys -------------------------------------------------------------------------------
    async def BatchResolve(self, request: pb.BatchResolveRequest, caller: Caller) -> bytes:
        return await finish(self.batch_resolve_now(request, caller))

    def batch_resolve_now(self, request: pb.BatchResolveRequest, caller: Caller) -> bytes | Later:
        n = len(request.keys)
        self.charge(caller, max(1, min(n, self.batch_max)))   # one per key (the Gate leaves batches to us)
        if n == 0:
            raise InvalidKey("keys is empty")
        if n > self.batch_max:
            raise InvalidKey(f"too many keys: {n} > the maximum of {self.batch_max} per batch")
        prepared: list[tuple[str, Lookup | CrsError | None, int, pb.LookupKey]] = []
        outcomes: list[bytes | CrsError | None] = []
        misses: list[int] = []
        pans, card_hit = caller.may(KEY_SCOPE["pan"]), self.card_hit
        for key in request.keys:
            cid = key.correlation_id
            if pans and key.WhichOneof("key") == "pan" and (cached := card_hit(key.pan)) is not None \
                    and len(cid) <= MAX_CORRELATION_ID:     # the fast path (card_hit)
                prepared.append((cid, None, RESOLUTION_FIELD, key))
                outcomes.append(cached)
                continue
            try:
                if len(cid) > MAX_CORRELATION_ID:
                    raise InvalidKey(f"correlation_id is longer than {MAX_CORRELATION_ID} characters")
                lookup, field = self.for_key(key, caller)
            except CrsError as exc:
                prepared.append((cid[:MAX_CORRELATION_ID], exc, RESOLUTION_FIELD, key))
                outcomes.append(exc)
                continue
            prepared.append((cid, lookup, field, key))
            try:
                value: bytes | CrsError | None = self.resolver.peek(lookup)
            except CrsError as exc:
                value = exc
            if value is None:
                misses.append(len(outcomes))
            outcomes.append(value)
        hits = sum(1 for outcome in outcomes if isinstance(outcome, bytes))
        if hits:
            self.resolver.metrics.tier_hit("l1", hits)

        def answer() -> bytes:
            return batch_response([self.result_of(cid, outcome, field, key)
                                   for (cid, _, field, key), outcome in zip(prepared, outcomes, strict=True)
                                   if outcome is not None])

        if not misses:
            return answer()

        async def later() -> bytes:
            todo = [prepared[i][1] for i in misses]
            found = await self.resolver.resolve_many([lk for lk in todo if isinstance(lk, Lookup)])
            for i, outcome in zip(misses, found, strict=True):
                outcomes[i] = outcome
            return answer()

        def refused(exc: CrsError) -> bytes:
            for i in misses:
                outcomes[i] = exc
            return answer()

        return Partial(later, refused)

    def StreamResolve(self, requests: AsyncIterator[pb.LookupKey], caller: Caller) -> AsyncIterator[bytes]:
        return stream_resolve(self, requests, caller)   # grpc.aio's; the hybrid model's: lookup_threads

    def stream_key(self, key: pb.LookupKey, caller: Caller) -> tuple[str, Lookup | bytes, int]:
        """One StreamResolve key before any I/O (both serving models): its correlation id, then its
        LookupResult when it is answered now (a near-cache hit, or an error) or else the Lookup to
        resolve, and the result field."""
        cid = key.correlation_id
        try:
            self.charge(caller, 1)
        except CrsError as exc:
            return cid[:MAX_CORRELATION_ID], self.result_of(cid[:MAX_CORRELATION_ID], exc, RESOLUTION_FIELD, key), \
                RESOLUTION_FIELD
        if len(cid) <= MAX_CORRELATION_ID and key.WhichOneof("key") == "pan" and caller.may(KEY_SCOPE["pan"]) \
                and (cached := self.card_hit(key.pan)) is not None:
            self.resolver.metrics.tier_hit("l1")
            return cid, lookup_result(cid, 0, "", cached), RESOLUTION_FIELD
        try:
            if len(cid) > MAX_CORRELATION_ID:
                cid = cid[:MAX_CORRELATION_ID]
                raise InvalidKey(f"correlation_id is longer than {MAX_CORRELATION_ID} characters")
            lookup, field = self.for_key(key, caller)
            value = self.resolver.cached(lookup)
        except CrsError as exc:
            return cid, self.result_of(cid, exc, RESOLUTION_FIELD, key), RESOLUTION_FIELD
        if value is not None:
            return cid, self.result_of(cid, value, field, key), field
        return cid, lookup, field

    def result_of(self, correlation_id: str, outcome: bytes | CrsError, field: int, key: pb.LookupKey) -> bytes:
        if isinstance(outcome, bytes):
            return lookup_result(correlation_id, 0, "", outcome, field)
        bin_range, decision = self.failure_extras(key, outcome)
        return lookup_result(correlation_id, rpc_code_number(outcome.code), outcome.message, None,
                             bin_range=bin_range, decision=decision)
