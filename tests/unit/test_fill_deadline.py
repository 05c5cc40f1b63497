"""A miss's fill is sent to Redis within its read's window (docs/decisions.md "Slow reads") even when
the shard's connection must be opened first. The window was checked before the fill started, and the
lean client then connected and authenticated (up to one CRS_REDIS_TIMEOUT each) before writing: a
fill whose read missed a write could land after the relay's second delete and keep the old row for
the TTL. A fake shard on a local socket answers AUTH late; no server is needed."""

from __future__ import annotations

import asyncio
import time

import hiredis
from prometheus_client import CollectorRegistry

from server.cache.breaker import BreakerPolicy
from server.cache.near import NearCache
from server.cache.thread_reads import L2
from server.cache.tier import RedisTier
from server.metrics import Metrics
from server.resolver import CachePolicy, Lookup, Resolver
from server.store.read_route import ReadRoute
from shard_router.topology import Topology, TopologyShard

WINDOW = 0.2          # the fill window (CRS_REINVALIDATE_DELAY - CRS_REDIS_TIMEOUT)
AUTH_DELAY = 0.4      # within the client's timeout below: the connection succeeds, late


class SlowHandshakeShard:
    """Answers every command +OK, AUTH only after AUTH_DELAY; keeps when each SET arrived."""

    def __init__(self) -> None:
        self.sets: list[tuple[float, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                if command[0].upper() == b"AUTH":
                    await asyncio.sleep(AUTH_DELAY)
                elif command[0].upper() == b"SET":
                    self.sets.append((time.monotonic(), command[1]))
                writer.write(b"+OK\r\n")
            await writer.drain()
        writer.close()


async def test_a_fill_is_not_sent_after_its_window_while_the_connection_opens() -> None:
    shard = SlowHandshakeShard()
    server = await asyncio.start_server(shard.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tier = RedisTier(topology=Topology(version=1, shards=(TopologyShard("shard-0", f"redis://:pw@127.0.0.1:{port}/0"),)),
                     pool_size=1, timeout=0.5, policy=BreakerPolicy())
    resolver = Resolver(near=NearCache(max_entries=10, ttl=60), tier=tier, policy=CachePolicy(),
                        metrics=Metrics(CollectorRegistry()),
                        route=ReadRoute.primary_only(object(), timeout=2.0, fill_window=WINDOW))

    async def load(_conn: object) -> bytes:
        return b"\x08\x01"     # the row as the read's snapshot had it

    try:
        started = time.monotonic()   # at or before the query's start: the window ends WINDOW later
        assert await resolver.resolve(Lookup("crd:1:aa", load, "card"), L2.MISS) == b"\x08\x01"
        await asyncio.sleep(AUTH_DELAY)   # anything written late has arrived by now
        late = [t - started for t, _ in shard.sets if t > started + WINDOW]
        assert not late, f"a fill reached Redis {late[0]:.2f} s after its read began (window {WINDOW} s)"
    finally:
        await tier.close()
        server.close()
        await server.wait_closed()
