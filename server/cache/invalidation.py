"""Invalidation on the shards: deleting keys (and announcing them), and listening for the keys other
nodes delete so this node drops them from its near-cache.

Deletes go to every owner a key has while keys move (shard_router.topology.Routing.also_invalidate)
and run under each shard's `delete_guard`: a shard that refuses a delete — by error reply or by not
answering — counts as failing, because it may otherwise keep serving a value that changed.
A shard with replicas gets every delete on every copy (server/cache/replicas.py), and a delete is
acknowledged only when all of them acknowledged it: the outbox row stays unsettled (and the relay
retries) while any copy has not seen it. Each copy publishes and is listened to: a node hears an
invalidation as long as one copy of the shard is reachable (hearing it twice is harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

from server.cache.replicas import ReplicatedShard
from server.cache.shard import SHARD_ERRORS, Shard
from shard_router.topology import Routing

log = logging.getLogger("crs.cache")

INVALIDATION_CHANNEL: Final = "crs:invalidate"
# An announcement is its keys, one per line, plus (with read replicas) one line "@wal:<position>":
# the primary's WAL position after the write committed (server/store/read_route.py). No cache key
# starts with "@", and a node that does not know the line drops it as a key it never held.
POSITION_PREFIX: Final = "@wal:"


def announcement(keys: list[str], position: int | None) -> str:
    return "\n".join(keys if position is None else [*keys, f"{POSITION_PREFIX}{position}"])


def parse_announcement(text: str) -> tuple[list[str], int | None]:
    """(keys, position) of an announcement; a malformed position line is ignored."""
    keys, position = [], None
    for line in text.split("\n"):
        if line.startswith(POSITION_PREFIX):
            digits = line[len(POSITION_PREFIX):]
            if digits.isdigit():
                position = int(digits)
        else:
            keys.append(line)
    return keys, position


# Keys per DEL and per announcement, each pair a pipeline of its own, sent one after another. A
# write to a big customer names every key of its cards and accounts (a corporate customer with
# 120,000 cards: a million keys with their generation and BIN forms). Sent as one pipeline a shard,
# tens of MB that redis-py must write within CRS_REDIS_TIMEOUT while Redis works through the DEL,
# the write timed out: the delete failed (left to the relay, which failed the same way) and the copy
# was marked down, its reads sent to PostgreSQL. 2,000 keys are ~100 KB and about a millisecond of
# Redis, which serves its other clients between them.
DELETE_CHUNK: Final = 2_000


OnKeys = Callable[[list[str], int | None], None]   # keys announced, the write's position if known
OnGap = Callable[[str, str], None]                 # (shard, copy) whose messages may have been missed
# How long a subscription may stay quiet before the listener asks the shard whether it is still there
# (a PING on the subscription, answered within PONG_SECONDS). A connection whose peer vanished without
# closing it (a host gone, a partition) delivers nothing and raises nothing; without the question it
# would stay silent for good and this node would miss every invalidation of the shard, its near-cache
# bounded only by the entries' TTL. A quiet spell ends in one wake-up per shard; a 1 s wait was a
# node's main per-shard cost at rest and under load (16 wake-ups a second at 16 shards).
# Not `timeout=None` on the wait: older redis-py releases (before the fix of redis-py #4098, 2026)
# read None as the client's socket timeout (0.25 s here), which would end every wait with an error
# and a near-cache drop.
QUIET_SECONDS: Final = 30.0
# Generous: a missed answer costs a reconnect and a near-cache drop, so a busy shard must not trip it.
PONG_SECONDS: Final = 5.0
LIVENESS: Final = b"crs-listener-alive"


class SubscriptionLost(ConnectionError):
    """A subscription did not answer a PING within PONG_SECONDS (a SHARD_ERROR: the listener reconnects)."""


async def delete_everywhere(routing: Routing, shards: Mapping[str, ReplicatedShard], keys: Iterable[str], *,
                            position: int | None = None) -> bool:
    """DEL the keys on their shards — both owners while keys move — and publish them for every node's
    near-cache, one pipeline per shard, all shards at once.

    True only if every owning shard acknowledged; the outbox relay retries otherwise. A shard that
    is marked down counts as not acknowledged: it will be flushed before it serves again, but the
    relay still retries so the record of the change is settled only once all shards saw it. (It
    does not wait a timeout for a shard this node already knows is down.) The same holds per copy.
    """
    key_list = sorted(set(keys))
    if not key_list:
        return True
    per_shard: dict[str, dict[str, None]] = {}
    for ring in (routing.read, routing.also_invalidate):
        if ring is None:
            continue
        for name, idx in ring.group_by_node(key_list).items():
            per_shard.setdefault(name, {}).update(dict.fromkeys(key_list[i] for i in idx))

    async def on_copy(shard: Shard, group: list[str]) -> None:
        for start in range(0, len(group), DELETE_CHUNK):
            part = group[start:start + DELETE_CHUNK]
            async with shard.client.pipeline(transaction=False) as pipe:
                pipe.delete(*part)
                pipe.publish(INVALIDATION_CHANNEL, announcement(part, position))
                await pipe.execute()

    async def one(shard: ReplicatedShard, group: list[str]) -> bool:
        return await shard.write_all(lambda copy: on_copy(copy, group), delete=True)

    acks = await asyncio.gather(*(one(shards[name], list(group)) for name, group in per_shard.items()))
    return all(acks)


class InvalidationListeners:
    """One pub/sub subscription per shard copy of the topology in force, following its changes.

    `on_gap(shard, copy)` runs when a subscription was lost, and again at each failed try to subscribe
    again: messages may have been missed, so the caller drops its near-cache.
    """

    def __init__(self) -> None:
        self._listening: tuple[OnKeys, OnGap, float] | None = None
        self._tasks: dict[str, tuple[Shard, asyncio.Task[None]]] = {}

    async def run(self, shards: Callable[[], Iterable[Shard]], on_keys: OnKeys,
                  on_gap: OnGap, *, retry_interval: float) -> None:
        """Subscribe on every shard `shards()` names now (`follow` adds later ones) until cancelled."""
        self._listening = (on_keys, on_gap, retry_interval)
        for shard in shards():
            self._start(shard)
        try:
            await asyncio.get_running_loop().create_future()   # until cancelled
        finally:
            self._listening = None
            tasks = [task for _, task in self._tasks.values()]
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def follow(self, shards: Iterable[Shard], retired: Iterable[Shard]) -> None:
        """A new topology: stop listening on retired shards, listen on the shards in force."""
        for shard in retired:
            entry = self._tasks.get(shard.ident)
            if entry is not None and entry[0] is shard:
                del self._tasks[shard.ident]
                entry[1].cancel()
        if self._listening is not None:
            for shard in shards:
                self._start(shard)

    def _start(self, shard: Shard) -> None:
        entry = self._tasks.get(shard.ident)
        if entry is not None and entry[0] is shard:
            return
        if entry is not None:
            entry[1].cancel()
        assert self._listening is not None
        on_keys, on_gap, retry_interval = self._listening
        task = asyncio.get_running_loop().create_task(_listen(shard, on_keys, on_gap, retry_interval))
        self._tasks[shard.ident] = (shard, task)


async def _listen(shard: Shard, on_keys: OnKeys, on_gap: OnGap, retry_interval: float) -> None:
    loop = asyncio.get_running_loop()
    first = True
    while True:
        pubsub = shard.client.pubsub()
        try:
            await pubsub.subscribe(INVALIDATION_CHANNEL)
            if not first:
                on_gap(shard.name, shard.copy)
            first = False
            asked = 0.0           # when a PING was sent that has not been answered; 0: none
            while True:
                wait = QUIET_SECONDS if not asked else asked + PONG_SECONDS - loop.time()
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=max(wait, 0.0))
                if msg is None:
                    if asked:
                        raise SubscriptionLost(f"{shard.name}: no answer to a PING within {PONG_SECONDS}s")
                    await pubsub.ping(LIVENESS)
                    asked = loop.time()
                elif msg["type"] == "message":
                    on_keys(*parse_announcement(msg["data"].decode()))
                elif msg["type"] == "pong" and msg["data"] == LIVENESS:
                    asked = 0.0
        except Exception as exc:
            if isinstance(exc, SubscriptionLost):   # rare, worth a line (a shard down logs via its breaker)
                log.warning("invalidation subscription went silent; subscribing again, near-cache dropped",
                            extra={"shard": shard.name})
            elif not isinstance(exc, SHARD_ERRORS):
                # A bug here or in the client library must not end the listener in silence: this node
                # would miss every later invalidation of the shard. Said loudly, then as a lost subscription.
                log.error("invalidation listener failed; subscribing again, near-cache dropped",
                          extra={"shard": shard.name, "copy": shard.copy}, exc_info=True)
            first = False
            on_gap(shard.name, shard.copy)
            await asyncio.sleep(retry_interval)
        finally:
            with contextlib.suppress(*SHARD_ERRORS):
                # redis-py types aclose() only from 8.2 on: typed here, so either version checks clean.
                close: Callable[[], Awaitable[None]] = pubsub.aclose
                await asyncio.shield(close())
