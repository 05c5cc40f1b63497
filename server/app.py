"""Builds a node: the gRPC server with its services, health and reflection, from settings.

The server is grpc.aio (CRS_SERVING_MODEL=aio, server/aio_handlers.py) or the synchronous grpc.server
with near-cache hits answered on its threads and everything else on this process's loop (hybrid,
server/hybrid.py); the gate, the handlers, the error mapping and the metrics are the same objects in both.

`Node` owns every resource of one node process (pools, cache tier, background tasks) and tears them
down in reverse order. Health follows the lifecycle: SERVING only once the pools are ready,
NOT_SERVING before `stop(grace)` so load balancers drain the node first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server import rpc
from server.admin import AdminHandlers
from server.aio_handlers import generic_handler
from server.auth import Authenticator, ClientRegistry, JwtVerifier
from server.background import BackgroundTasks
from server.bin_source import BinSource, card_answer_life
from server.cache.near import NearCache
from server.cache.thread_reads import ThreadReads
from server.cache.tier import RedisTier
from server.db_health import probe_database
from server.decisions import DecisionTable, parse_network_codes
from server.errors import BackendUnavailable
from server.feed.service import FeedHandlers
from server.feed.tailer import FeedTailer
from server.gate import Gate
from server.grpc_pool import GrpcThreadPool
from server.housekeeping import compaction, idempotency_pruning
from server.hybrid import REFUSAL_THREADS, WAITING_SHARE, HybridHandlers, LoopBridge
from server.identity.model import MatchModel, Thresholds
from server.identity_service import IdentityHandlers
from server.lookup import LookupHandlers
from server.metrics import FLUSH_INTERVAL, Metrics
from server.reflection import SERVICE_NAMES as REFLECTION
from server.reflection import add_reflection
from server.relay import run_relay, unsettled_keys
from server.resolver import CachePolicy, Resolver
from server.settings import Settings, catch_up_reads_of, fill_window_of, streams_per_client_of
from server.store.db import DB_ERRORS, active_data_key, bounded, create_pool, verify_key_checks
from server.store.identity import IdentityCodec, IdentityReads
from server.store.merge import IdentityStore
from server.store.migrate import check_schema
from server.store.read_route import ReadRoute
from server.stream_stall import StallWatch, StreamSlots
from server.sync_health import ThreadedHealth
from server.topology.watch import TopologyWatcher

log = logging.getLogger("crs.node")


async def close_pool(pool: asyncpg.Pool, timeout: float) -> None:
    """Close gracefully (each connection says goodbye to the server) within `timeout`; a database that
    does not answer gets its connections dropped instead."""
    try:
        await bounded(pool.close(), timeout)   # bounded: asyncpg's cancel cleanup would wait on the database
    except TimeoutError:
        pool.terminate()
        log.warning("PostgreSQL did not answer the pool's close in time; its connections were dropped")


def build_authenticator(s: Settings) -> Authenticator:
    registry = ClientRegistry.from_file(Path(s.clients_file)) if s.clients_file else None
    verifier = (JwtVerifier(jwks_file=Path(s.jwt_jwks_file), audience=s.jwt_audience, issuer=s.jwt_issuer,
                            leeway=s.jwt_leeway)
                if s.jwt_jwks_file else None)
    if s.allow_anonymous:
        log.warning("CRS_ALLOW_ANONYMOUS is on: callers without credentials get every scope (dev only)")
    return Authenticator(registry=registry, jwt=verifier, allow_anonymous=s.allow_anonymous,
                         mtls=bool(s.tls_client_ca_file))


def bind_ports(server: grpc.aio.Server | grpc.Server, s: Settings, metrics: Metrics | None = None) -> int:
    """The gRPC port: mutual TLS when a client CA is configured, TLS otherwise, plaintext only when
    explicitly allowed. The optional token port: server-only TLS for bearer-token callers."""
    address = f"{s.grpc_host}:{s.grpc_port}"
    if s.tls_cert_file:
        pair = [(Path(s.tls_key_file).read_bytes(), Path(s.tls_cert_file).read_bytes())]
        client_ca = Path(s.tls_client_ca_file).read_bytes() if s.tls_client_ca_file else None
        port: int = server.add_secure_port(address, grpc.ssl_server_credentials(
            pair, root_certificates=client_ca, require_client_auth=client_ca is not None))
        if s.token_port:
            server.add_secure_port(f"{s.grpc_host}:{s.token_port}", grpc.ssl_server_credentials(pair))
        if metrics is not None:
            with contextlib.suppress(ValueError):   # grpc accepted the chain; a metric never stops a node
                metrics.tls_certificate(pair[0][1])
    else:
        log.warning("serving PLAINTEXT gRPC (CRS_ALLOW_PLAINTEXT): development only", extra={"address": address})
        port = int(server.add_insecure_port(address))
    if not port:
        raise RuntimeError(f"cannot bind {address}")
    return port


async def serve_health_alone(health_service: Any, s: Settings, pool: GrpcThreadPool | None = None
                             ) -> grpc.aio.Server | grpc.Server:
    """grpc.health.v1.Health alone, in plaintext, on CRS_HEALTH_PORT: for probes that cannot do TLS
    (Kubernetes' gRPC probes). What it tells is no secret, and nothing else answers there; the same
    health object as the main port's, so both say the same. Started and stopped with the node.
    `pool`: the synchronous server's threads (hybrid; its owner shuts it down). Its watch closes calls
    that never send their message: two such calls would otherwise fail every probe."""
    address = f"{s.grpc_host}:{s.health_port}"
    server: grpc.aio.Server | grpc.Server
    if isinstance(health_service, ThreadedHealth):
        if pool is None:
            raise ValueError("the synchronous health server needs its pool")
        server = grpc.server(pool, options=rpc.SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(health_service.servicer, server)
    else:
        server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    if not server.add_insecure_port(address):
        raise RuntimeError(f"cannot bind {address}")
    await start_server(server)
    return server


async def start_server(server: grpc.aio.Server | grpc.Server) -> None:
    if isinstance(server, grpc.aio.Server):
        await server.start()
    else:
        server.start()


async def stop_server(server: grpc.aio.Server | grpc.Server, grace: float | None) -> None:
    """Stop either kind of server and wait until it has: the sync server stops on its own threads."""
    stopped = server.stop(grace)
    if isinstance(stopped, threading.Event):
        await asyncio.get_running_loop().run_in_executor(None, stopped.wait)
    else:
        await stopped


class Node:
    """One node process: `await node.start()`, serve, `await node.stop()`."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.keyring = settings.keyring()   # a bad key fails here, at start-up
        self.pool: asyncpg.Pool | None = None
        self.read_pool: asyncpg.Pool | None = None   # replicas (CRS_PG_READ_DSN), for cache misses
        self.tier: RedisTier | None = None
        self.topology: TopologyWatcher | None = None
        self.server: grpc.aio.Server | grpc.Server | None = None
        self._health_server: grpc.aio.Server | grpc.Server | None = None   # CRS_HEALTH_PORT
        self.hybrid = settings.serving_model == "hybrid"
        self.health: health.aio.HealthServicer | ThreadedHealth = (
            ThreadedHealth(settings.loop_stall_seconds) if self.hybrid else health.aio.HealthServicer())
        self.resolver: Resolver | None = None
        self.bins: BinSource | None = None
        self.tailer: FeedTailer | None = None
        self.stalls: StallWatch | None = None   # the open server streams (server/stream_stall.py)
        self.background = BackgroundTasks()   # .broken: one failed; the process exits 1
        self._bridge: LoopBridge | None = None          # hybrid: gRPC threads -> this loop
        self._executor: GrpcThreadPool | None = None  # hybrid: the gRPC threads
        self._stream_executor: GrpcThreadPool | None = None  # hybrid: the streams' threads
        self._health_executor: GrpcThreadPool | None = None  # hybrid: CRS_HEALTH_PORT's threads
        self.port: int = 0

    async def start(self) -> None:
        s = self.settings
        self.pool = await create_pool(s, session_reset=False)   # the node keeps no session state
        async with self.pool.acquire() as conn:
            await check_schema(conn)
        await verify_key_checks(self.pool, self.keyring)
        data_key = await active_data_key(self.pool, self.keyring)
        if s.pg_read_dsn:   # no connection yet: a replica that is down must not stop a node from starting
            self.read_pool = await create_pool(s, dsn=s.pg_read_dsn, min_size=0, session_reset=False)
        route = ReadRoute(primary=self.pool, replica=self.read_pool, fill_window=fill_window_of(s),
                          position_interval=s.pg_position_interval, timeout=s.pg_timeout,
                          replica_timeout=s.pg_timeout / 4, on_read=self.metrics.pg_read,
                          on_staleness=self.metrics.pg_replica_staleness.set)
        await route.poll_once()   # the first replica reads are judged against a primary position already
        near = NearCache(max_entries=s.near_cache_size, ttl=s.near_cache_ttl, max_bytes=s.near_cache_bytes,
                         refresh=s.near_cache_ttl * s.near_cache_refresh)
        self.topology = TopologyWatcher(settings=s, pool=self.pool, metrics=self.metrics)
        self.tier = await self.topology.open_tier()   # the published topology, else CRS_REDIS_SHARDS
        cached_for = card_answer_life(s)   # after its version's deactivation
        if self.tier is not None:   # a copy back from an outage deletes these keys, not all (server/cache/shard.py)
            self.tier.missed_deletes = functools.partial(unsettled_keys, self.pool, cached_for=cached_for,
                                                         timeout=s.pg_timeout)
        self.resolver = Resolver(near=near, tier=self.tier, metrics=self.metrics, route=route,
                                 load_timeout=s.pg_timeout, batch_loads=max(1, s.pg_pool_max // 2),
                                 policy=CachePolicy(ttl=s.cache_ttl, ttl_jitter=s.cache_ttl_jitter,
                                                    negative_ttl=s.negative_ttl))
        if self.hybrid and s.redis_thread_connections > 0 and self.tier is not None:
            # A Redis hit is read on the gRPC thread, not handed to this loop (server/cache/thread_reads.py).
            self.resolver.thread_reads = ThreadReads(self.tier, asyncio.get_running_loop(),
                                                     on_busy=self.metrics.thread_read_busy)
        self.bins = bins = BinSource(pool=self.pool, metrics=self.metrics, interval=s.bin_poll_interval,
                                     timeout=s.pg_timeout, cached_for=cached_for)
        self.resolver.bin_versions = lambda: bins.versions
        with contextlib.suppress(*DB_ERRORS):   # no table yet is no reason not to serve; run() keeps trying
            await self.bins.refresh()
        lookup = LookupHandlers(resolver=self.resolver, keyring=self.keyring,
                                pg_timeout=s.pg_timeout, batch_max=s.batch_max, bins=self.bins,
                                decisions=DecisionTable(parse_network_codes(s.decision_network_codes)),
                                card_answer_life=cached_for)
        codec = IdentityCodec(keyring=self.keyring, data_key=data_key)
        model = MatchModel.load(s.identity_weights or None)
        thresholds = Thresholds(match=s.identity_match_threshold, review=s.identity_review_threshold)
        writes = IdentityStore(pool=self.pool, keyring=self.keyring, data_key=data_key, timeout=s.pg_timeout,
                                codec=codec, model=model, thresholds=thresholds, policy=s.identity_possible_match)
        admin = AdminHandlers(store=writes, resolver=self.resolver)
        identity = IdentityHandlers(reads=IdentityReads(pool=self.pool, codec=codec, model=model,
                                                        thresholds=thresholds, timeout=s.pg_timeout), writes=admin)
        self.tailer = FeedTailer(
            pool=self.pool, poll_interval=s.feed_poll_interval, batch=s.feed_batch, queue_size=s.feed_queue_size,
            timeout=s.pg_timeout, on_change=self.metrics.feed_state,
            # No LISTEN behind PgBouncer in transaction mode (CRS_FEED_LISTEN=false): polling alone.
            connect=(lambda: asyncpg.connect(s.pg_dsn, timeout=s.pg_timeout)) if s.feed_listen else None)
        feed = FeedHandlers(pool=self.pool, tailer=self.tailer, timeout=s.pg_timeout, batch=s.feed_batch,
                            progress_interval=s.feed_progress_interval, snapshot_chunk=s.feed_snapshot_chunk,
                            snapshot_max=s.feed_snapshot_max, snapshot_stall=s.feed_snapshot_stall,
                            catch_up_reads=catch_up_reads_of(s), on_catch_up_waiting=self.metrics.feed_waiting_turn.set,
                            on_catch_up_taken_back=self.metrics.feed_turns_taken_back.inc)
        options = [*rpc.SERVER_OPTIONS, *rpc.keepalive_options(s.keepalive_time, s.keepalive_timeout)]
        if s.max_connection_age:
            options += [("grpc.max_connection_age_ms", int(s.max_connection_age * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(s.grace_seconds * 1000))]
        gate = Gate(build_authenticator(s))
        self.stalls = stalls = StallWatch(limit=s.stream_stall, limits={"Snapshot": s.feed_snapshot_stall},
                                          metrics=self.metrics)
        per_client = streams_per_client_of(s)
        slots = StreamSlots(s.stream_threads, lambda caller: gate.authenticator.stream_share(caller, per_client))
        lookup.charge = gate.authenticator.admit   # a batch's and a stream's keys pay too
        services = ((rpc.LOOKUP_SERVICE, lookup), (rpc.ADMIN_SERVICE, admin), (rpc.FEED_SERVICE, feed),
                    (rpc.IDENTITY_SERVICE, identity))
        server: grpc.aio.Server | grpc.Server
        if isinstance(self.health, ThreadedHealth):
            # The hybrid model: gRPC threads (server/grpc_pool.py) answer near-cache hits, this loop does the
            # rest (server/hybrid.py).
            wait = s.message_wait_ms / 1000
            self._executor = GrpcThreadPool(max_workers=s.serving_threads, thread_name_prefix="crs-grpc",
                                            shed_target=s.shed_queue_ms / 1000, active=s.serving_active,
                                            message_wait=wait)
            self._stream_executor = GrpcThreadPool(max_workers=s.stream_threads + REFUSAL_THREADS,
                                                   thread_name_prefix="crs-stream", message_wait=wait)
            server = grpc.server(self._executor, options=options)
            self._bridge = LoopBridge(asyncio.get_running_loop(),
                                      max_waiting=max(1, int(s.serving_threads * WAITING_SHARE)))
            threaded = HybridHandlers(bridge=self._bridge, metrics=self.metrics, gate=gate,
                                      stream_pool=self._stream_executor, slots=slots, stalls=stalls)
            server.add_generic_rpc_handlers(tuple(threaded.generic_handler(svc, target) for svc, target in services))
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        else:
            server = grpc.aio.server(options=options)
            server.add_generic_rpc_handlers(tuple(generic_handler(svc, target, self.metrics, gate, stalls, slots)
                                                  for svc, target in services))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        add_reflection(server, [svc.full_name for svc in rpc.SERVICES]    # registered callers only
                       + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, *REFLECTION], gate.authenticator,
                       stream_pool=self._stream_executor, slot=slots.slot)
        self.port = bind_ports(server, s, self.metrics)
        if s.health_port:
            if isinstance(self.health, ThreadedHealth):
                self._health_executor = GrpcThreadPool(max_workers=2, thread_name_prefix="crs-health",
                                                       message_wait=s.message_wait_ms / 1000)
            self._health_server = await serve_health_alone(self.health, s, self._health_executor)
        self.server = server
        await start_server(server)
        if self.tier is not None:
            def gap(shard: str, copy: str) -> None:
                near.clear()
                self.metrics.invalidation_gap(shard, copy)

            self.background.start("invalidations", self.tier.listen_invalidations(
                self.resolver.on_invalidated, gap, retry_interval=s.shard_retry_interval))
        self.background.start("relay", run_relay(
            self.pool, self.resolver, self.metrics, delay=s.reinvalidate_delay, interval=s.outbox_poll_interval,
            cached_for=self.bins.cached_for))
        self.background.start("topology", self.topology.run(host=s.grpc_host, port=self.port))
        self.background.start("feed-tailer", self.tailer.run())
        self.background.start("bins", self.bins.run())
        self.background.start("database-probe", probe_database(
            self.pool, self.health, self.metrics, interval=s.db_health_interval, timeout=s.pg_timeout))
        self.background.start("feed-compaction", compaction(self.pool, retention=s.feed_retention,
                                                            interval=s.feed_compact_interval))
        self.background.start("idempotency-pruning", idempotency_pruning(self.pool, retention=s.idempotency_retention))
        self.background.start("metrics-flush", self._flush_metrics())
        self.background.start("shard-idle-probes", self._probe_idle_shards())
        self.background.start("read-route", route.run())
        self.background.start("stream-stalls", stalls.run())
        self.resolver.start_refreshing(asyncio.get_running_loop())
        for svc in ("", *(svc.full_name for svc in rpc.SERVICES)):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("node serving", extra={"address": f"{s.grpc_host}:{self.port}", "serving_model": s.serving_model,
                                        **self.topology.in_force()})

    async def _probe_idle_shards(self) -> None:
        """Take back a shard that came back while this process had no traffic for it (the lookups that
        want a shard start its probe: server/cache/breaker.py, Breaker.start_idle_probe)."""
        while True:
            await asyncio.sleep(1.0)
            for copy in self.tier.copies() if self.tier is not None else ():
                copy.breaker.start_idle_probe(self.settings.shard_idle_probe)

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.metrics.flush()
            if self._executor is not None and self._bridge is not None:
                closed = sum(p.closed for p in (self._executor, self._stream_executor, self._health_executor) if p)
                self.metrics.serving_waits(self._executor.backlog(), self._bridge.waiting(), self._executor.revoked,
                                           closed)
            if self.pool is not None:
                self.metrics.pg_pool(self.pool.get_size(), self.pool.get_idle_size(), self.pool.get_max_size())

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, stop accepting, let in-flight calls finish within `grace`, release.

        Between NOT_SERVING and closing the listener the node keeps answering for `drain_delay`
        seconds (lame duck): clients that watch health (server/client_config.py) move their new
        calls to other nodes first, so none arrives at a server that is closing (those fail
        CANCELLED, which no retry policy should retry)."""
        self.background.stopping()
        await self.health.enter_graceful_shutdown()
        if grace != 0 and self.server is not None and self.settings.drain_delay:
            await asyncio.sleep(self.settings.drain_delay)
        if self.tailer is not None:   # watch streams never end by themselves: end them, they resume elsewhere
            self.tailer.close(BackendUnavailable("the node is shutting down; resume from your last sequence"))
        if self.stalls is not None:   # nor do StreamResolves: cut at the end of the grace, their keys unanswered
            self.stalls.end_all("StreamResolve", grpc.StatusCode.UNAVAILABLE, "the node is shutting down; send"
                                " the keys not answered on this stream to another node")
        if self.server is not None:
            await stop_server(self.server, self.settings.grace_seconds if grace is None else grace)
            self.server = None
        if self._health_server is not None:   # last: probes saw NOT_SERVING through the drain
            await stop_server(self._health_server, 0)
            self._health_server = None
        if self._bridge is not None:   # hybrid: no gRPC thread may wait on this loop once it stops
            self._bridge.close()
        if isinstance(self.health, ThreadedHealth):
            self.health.close()
        for executor in (self._executor, self._stream_executor, self._health_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        if self.resolver is not None:
            self.resolver.stop()
        await self.background.stop()
        self.metrics.flush()
        # What is left talks to PostgreSQL, which may not answer (a failover, a partition): each step
        # is bounded by pg_timeout, so the node still exits.
        if self.topology is not None:
            with contextlib.suppress(TimeoutError):   # best effort: the heartbeat's lease expires anyway
                await bounded(self.topology.forget(), self.settings.pg_timeout)
        if self.tier is not None:
            await self.tier.close()
            self.tier = None
        for pool in (self.read_pool, self.pool):
            if pool is not None:
                await close_pool(pool, self.settings.pg_timeout)
        self.read_pool = self.pool = None
        log.info("node stopped")
