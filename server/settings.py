"""The one typed settings object, built once at start-up and handed to the parts that need it.

Sources, later wins: defaults < config file (TOML, `CRS_CONFIG` or `--config`) < environment
variables `CRS_*`. Every value is checked at once and a wrong one names the variable. README.md
lists every variable with its default. No other module reads os.environ.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from server.crypto import KeyConfigError, Keyring, decode_key, parse_versioned_keys
from server.decisions import DEFAULT_NETWORK_CODES, parse_network_codes
from server.logs import DEFAULT_REPEAT_INTERVAL
from shard_router.addresses import ShardAddress, ShardListError, format_shards, parse_shards


class SettingsError(ValueError):
    """A configuration value is missing or wrong; the message names it."""


SERVING_MODELS = ("aio", "hybrid")


@dataclass(frozen=True)
class Settings:
    # --- network
    grpc_host: str = "127.0.0.1"          # bind address; 0.0.0.0 in a pod
    grpc_port: int = 50051
    workers: int = 0                      # node processes sharing the port (SO_REUSEPORT); 0 = CPU count
    share_port: bool = False              # start even if other processes serve grpc_port (the token and health
                                          # ports too): N single-process nodes on one port; False: refused
    metrics_port: int = 9464              # Prometheus /metrics on the same host; 0 = off
    grace_seconds: float = 10.0           # SIGTERM: stop accepting, finish in-flight calls this long
    drain_delay: float = 1.0              # SIGTERM: NOT_SERVING but still answering this long first (lame duck)
    loop_stall_seconds: float = 10.0      # a node process whose event loop has not run this long is stuck: its
                                          # health answers NOT_SERVING (hybrid; on grpc.aio health runs on the
                                          # loop) and `crs serve` kills it and starts another; 0 = never
    max_connection_age: float = 0.0       # seconds before the server asks a client to reconnect (0 = never);
                                          # lets round-robin clients find pods an autoscaler added
    keepalive_time: float = 30.0          # seconds between the server's HTTP/2 pings on a connection: a client
                                          # gone without closing it (host lost, partition) is dropped with its
                                          # calls and streams after this plus keepalive_timeout
    keepalive_timeout: float = 10.0       # seconds a ping may go unanswered before the connection is closed
    # --- serving model (docs/decisions.md "Serving model: hybrid")
    serving_model: str = "hybrid"         # "hybrid": sync grpc.server threads answer near-cache hits inline,
                                          # everything else runs on the process's asyncio loop; "aio": grpc.aio
                                          # on uvloop for every call (the previous model, kept for one release)
    serving_threads: int = 64             # hybrid: gRPC threads per node process for unary calls; each call in
                                          # flight holds one, also while it waits on the event loop (a cache
                                          # miss, PostgreSQL); at most 3/4 of them wait there at once
    serving_active: int = 16              # hybrid: of those, how many take calls at once; a call that waits on
                                          # the loop lets another thread take calls in its place, so a node past
                                          # capacity queues (and sheds) as 16 threads would, while 48 misses may
                                          # wait as 64 threads let them (docs/decisions.md "Threads that wait
                                          # and threads that work"); >= serving_threads: every thread
    shed_queue_ms: float = 5.0            # hybrid: when even the shortest wait for a gRPC thread over 100 ms was
                                          # longer than this, a call that waited twice as long is refused
                                          # UNAVAILABLE unanswered (CoDel, server/grpc_pool.py); 0 = never
    message_wait_ms: float = 5000.0       # hybrid: a call whose request message has not come this long after a
                                          # gRPC thread took it is closed UNAVAILABLE (after 100 ms while calls
                                          # wait for a thread that none frees): it holds the thread meanwhile;
                                          # 0 = wait for it as long as the call's deadline lets it
    stream_threads: int = 512             # open streams (StreamResolve, Watch, Snapshot, reflection) per
                                          # process, hybrid: each on a thread of its own pool (never a unary
                                          # call's); one more is refused at once, UNAVAILABLE (retry elsewhere)
    streams_per_client: int = 0           # of those, the most one client may hold open (a clients-file
                                          # "max_streams" overrides it per client); 0 = 3/4 of stream_threads
    stream_stall: float = 120.0           # seconds a stream's message may wait unsent (its client stopped reading)
                                          # before the node ends it, RESOURCE_EXHAUSTED (server/stream_stall.py)
    # --- transport security and callers (docs/security.md)
    tls_cert_file: str = ""               # server certificate chain (PEM); empty = plaintext (needs allow_plaintext)
    tls_key_file: str = field(default="", repr=False)
    tls_client_ca_file: str = ""          # CA for client certificates: set = mutual TLS required on grpc_port
    token_port: int = 0                   # optional second port: server-only TLS, callers use bearer tokens
    health_port: int = 0                  # optional plaintext port serving grpc.health.v1.Health only (probes)
    allow_plaintext: bool = False         # dev only: no TLS at all (the node logs a warning)
    allow_anonymous: bool = False         # dev only: callers without credentials get every scope
    clients_file: str = ""                # JSON: client ids, scopes, certificate names, rate limits
    jwt_jwks_file: str = ""               # JWKS with the public keys bearer tokens are signed with
    jwt_audience: str = "crs-lookup"
    jwt_issuer: str = ""                  # required issuer ("" = not checked)
    jwt_leeway: float = 30.0              # seconds a token's exp/nbf/iat may be off by this node's clock
    # --- PostgreSQL (system of record)
    pg_dsn: str = field(default="", repr=False)
    pg_pool_min: int = 2
    pg_pool_max: int = 20                 # per node process; size it to the concurrency (DESIGN.md §2)
    pg_timeout: float = 2.0               # seconds for one load (pool wait + query) before DEADLINE_EXCEEDED
    pg_statement_cache_size: int = 256    # prepared statements per connection; 0 behind PgBouncer (transaction mode)
    pg_read_dsn: str = field(default="", repr=False)  # replicas for cache misses ("" = the primary); docs/deploy.md
    pg_position_interval: float = 0.1     # seconds between polls of the primary's WAL position (replica freshness)
    # --- Redis cache tier
    redis_shards: tuple[ShardAddress, ...] = ()
    redis_pool_size: int = 32             # connections per shard per node process
    redis_timeout: float = 0.25           # seconds per Redis command; a slow shard counts as a failure
    redis_thread_connections: int = 8     # hybrid: connections per shard copy per process for GETs made on gRPC
                                          # threads (a Redis hit answered without the loop); 0 = every read on the loop
    cache_ttl: float = 300.0              # L2 TTL for found keys, seconds
    cache_ttl_jitter: float = 0.1         # +- fraction of the TTL, so keys loaded together expire apart
    negative_ttl: float = 30.0            # L2 TTL for keys that matched nothing
    cache_preferred_copy: str = ""        # copy reads try first: primary, replica-1, ... (its zone's); "" = spread
    shard_failure_threshold: int = 3      # consecutive errors before a shard is marked down
    shard_retry_interval: float = 5.0     # seconds a down shard is skipped before it is probed again
    shard_idle_probe: float = 30.0        # seconds a down shard nothing asks for waits before the node probes it itself
    # --- shard topology and resharding (docs/runbooks/resharding.md)
    topology_file: str = ""               # JSON topology file instead of the shard_topology table ("" = PostgreSQL)
    topology_poll_interval: float = 1.0   # seconds between a node's topology checks (bounds the pickup delay)
    topology_lease: float = 10.0          # a node silent this long is presumed gone; it stops filling Redis
    shard_stats_interval: float = 10.0    # seconds between a node's INFO of each shard for metrics (0 = off)
    migration_rate: int = 20_000          # keys per second the resharding warmer and cleanup examine
    migration_batch: int = 500            # keys per SCAN step of the warmer and cleanup
    # --- near-cache (L1, in process)
    near_cache_size: int = 100_000        # entries per node process; 0 disables L1
    near_cache_bytes: int = 256 * 1024 * 1024   # the answers' bytes per node process (big profiles)
    near_cache_ttl: float = 2.0           # seconds; also the worst-case staleness if pub/sub is lost
    near_cache_refresh: float = 0.25      # refresh-ahead: a hit in the last this fraction of the TTL reloads (0 = off)
    # --- consistency
    reinvalidate_delay: float = 0.5       # the relay deletes a write's keys again this long after commit
    outbox_poll_interval: float = 0.5     # relay scan period, seconds
    # --- API limits
    batch_max: int = 1000                 # keys per BatchResolve
    idempotency_retention: float = 604_800.0  # seconds a write's request_id replays its answer (7 days); then
                                              # pruned, and a retry with it is a new write
    # --- change feed (docs/feed.md)
    feed_retention: float = 604_800.0     # seconds events are kept (7 days); older ones are compacted
    feed_listen: bool = True              # LISTEN for commits; false behind PgBouncer in transaction mode (poll only)
    feed_poll_interval: float = 0.5       # seconds between the tailer's reads when no NOTIFY wakes it
    feed_progress_interval: float = 2.0   # an idle watcher gets a Progress mark this often, seconds
    feed_queue_size: int = 10_000         # events queued per watcher; one further behind catches up from PostgreSQL
    feed_batch: int = 1000                # events per read (tailer, catch-up)
    feed_catch_up_reads: int = 0          # Watches behind the live tail reading from the table and delivering what
                                          # they read at once per process (the others wait their turn, leaving the
                                          # pool and the node to lookups); 0 = 4, at most half of pg_pool_max
    feed_snapshot_chunk: int = 500        # entities per SnapshotChunk
    feed_snapshot_max: int = 2            # Snapshots running at once per node process (each holds a connection)
    feed_snapshot_stall: float = 120.0    # seconds a Snapshot chunk may wait unread before its transaction ends
                                          # (and one snapshot read may run)
    feed_compact_interval: float = 300.0  # seconds between compaction runs (one node at a time)
    # --- decision hints (docs/decision-hints.md)
    decision_network_codes: str = DEFAULT_NETWORK_CODES   # per-network code substitutions, NETWORK:CODE=CODE,...
    # --- health
    db_health_interval: float = 1.0       # seconds between probes behind the crs.v1.Database health status
    # --- BIN table (docs/bins.md)
    bin_poll_interval: float = 5.0        # seconds between checks for a newly activated BIN table version
    # --- customer identity (docs/identity.md)
    identity_match_threshold: float = 0.99   # match probability at or above which a person is the same customer
    identity_review_threshold: float = 0.80  # at or above (below match): POSSIBLE_MATCH, a person reviews
    identity_possible_match: str = "review"  # CreateCustomer on POSSIBLE_MATCH: "review" (create + queue) or "refuse"
    identity_weights: str = ""               # a trained weights file; "" = the packaged one
    # --- keys (never in repr)
    fingerprint_keys: str = field(default="", repr=False)   # "1:BASE64,2:BASE64"
    fingerprint_key_version: int = 0      # 0 = the only configured version (refused with two or more)
    kek: str = field(default="", repr=False)                # "BASE64" (32 bytes)
    kek_version: int = 1
    kek_previous: str = field(default="", repr=False)       # the KEK being rotated away from (rotate-kek)
    kek_previous_version: int = 0
    # --- logging
    log_level: str = "INFO"
    log_repeat_interval: float = DEFAULT_REPEAT_INTERVAL   # seconds (server/logs.py, RepeatLimiter)

    def keyring(self) -> Keyring:
        try:
            fp_keys = parse_versioned_keys(self.fingerprint_keys, what="CRS_FINGERPRINT_KEYS")
            if not self.fingerprint_key_version and len(fp_keys) > 1:
                # "The highest" would switch a node to a key added for a rotation before any row has
                # a fingerprint under it (docs/security.md, "Rotation runbooks", step 1).
                raise KeyConfigError(
                    f"CRS_FINGERPRINT_KEY_VERSION must name the version to use when CRS_FINGERPRINT_KEYS holds"
                    f" more than one key (versions {sorted(fp_keys)}): during a rotation keep the old one until"
                    " `crs keys rotate-fingerprint --to NEW` has run")
            version = self.fingerprint_key_version or max(fp_keys)
            previous = {}
            if self.kek_previous:
                if not self.kek_previous_version or self.kek_previous_version == self.kek_version:
                    raise KeyConfigError("CRS_KEK_PREVIOUS_VERSION must name the old KEK's version"
                                         " (different from CRS_KEK_VERSION)")
                previous[self.kek_previous_version] = decode_key(self.kek_previous, what="CRS_KEK_PREVIOUS")
            return Keyring(fingerprint_keys=fp_keys, fingerprint_version=version,
                           kek=decode_key(self.kek, what="CRS_KEK"), kek_version=self.kek_version,
                           previous_keks=previous)
        except KeyConfigError as exc:
            raise SettingsError(str(exc)) from exc

    def effective_workers(self) -> int:
        return self.workers or (os.cpu_count() or 1)


_ENV_PREFIX = "CRS_"
# Variables that name a file whose content is the value (mounted secrets).
_FILE_VARIANTS = {"kek": "CRS_KEK_FILE", "fingerprint_keys": "CRS_FINGERPRINT_KEYS_FILE", "pg_dsn": "CRS_PG_DSN_FILE",
                  "pg_read_dsn": "CRS_PG_READ_DSN_FILE",
                  "kek_previous": "CRS_KEK_PREVIOUS_FILE"}


def _coerce(name: str, raw: Any, default: Any) -> Any:
    where = _ENV_PREFIX + name.upper()
    if name == "redis_shards":
        if not isinstance(raw, str):   # only a TOML file gives another type; the value (a password?) not shown
            raise SettingsError(f"{where}: redis_shards in a config file must be one string (got {type(raw).__name__})")
        try:
            return parse_shards(raw)
        except ShardListError as exc:
            raise SettingsError(f"{where}: {exc}") from exc
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{where}={raw!r} is not a valid {type(default).__name__}") from exc


def _validate(s: Settings) -> None:
    problems: list[str] = []
    positive = ("pg_pool_min", "pg_pool_max", "redis_pool_size", "batch_max", "shard_failure_threshold", "feed_batch",
                "stream_threads", "feed_queue_size", "feed_snapshot_chunk", "feed_snapshot_max", "feed_snapshot_stall",
                "near_cache_bytes")
    for name in positive:
        if getattr(s, name) <= 0:
            problems.append(f"CRS_{name.upper()} must be > 0 (got {getattr(s, name)})")
    nonneg = ("workers", "metrics_port", "near_cache_size", "fingerprint_key_version", "pg_statement_cache_size",
              "redis_thread_connections", "streams_per_client", "feed_catch_up_reads", "max_connection_age",
              "drain_delay")
    for name in nonneg:
        if getattr(s, name) < 0:
            problems.append(f"CRS_{name.upper()} must be >= 0 (got {getattr(s, name)})")
    for name in ("pg_timeout", "redis_timeout", "cache_ttl", "negative_ttl", "near_cache_ttl",
                 "shard_retry_interval", "shard_idle_probe", "outbox_poll_interval", "grace_seconds", "feed_retention",
                 "idempotency_retention", "log_repeat_interval",
                 "feed_poll_interval", "feed_progress_interval", "feed_compact_interval", "bin_poll_interval",
                 "db_health_interval", "pg_position_interval", "stream_stall"):
        if getattr(s, name) <= 0:
            problems.append(f"CRS_{name.upper()} must be > 0 seconds (got {getattr(s, name)})")
    if not 0 <= s.near_cache_refresh < 0.8:
        problems.append(f"CRS_NEAR_CACHE_REFRESH must be in [0, 0.8): a fraction of CRS_NEAR_CACHE_TTL, below "
                        f"the shortest entry life (got {s.near_cache_refresh})")
    if not 0 <= s.cache_ttl_jitter < 1:
        problems.append(f"CRS_CACHE_TTL_JITTER must be in [0, 1) (got {s.cache_ttl_jitter})")
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        problems.append("CRS_TLS_CERT_FILE and CRS_TLS_KEY_FILE go together")
    if s.tls_client_ca_file and not s.tls_cert_file:
        problems.append("CRS_TLS_CLIENT_CA_FILE needs CRS_TLS_CERT_FILE (mutual TLS is TLS first)")
    if s.token_port and not (s.tls_cert_file and s.jwt_jwks_file):
        problems.append("CRS_TOKEN_PORT needs CRS_TLS_CERT_FILE and CRS_JWT_JWKS_FILE")
    if (s.tls_client_ca_file or s.jwt_jwks_file) and not s.clients_file:
        problems.append("CRS_CLIENTS_FILE is required to map certificates and tokens to clients and scopes")
    for name in ("token_port", "health_port"):
        if not 0 <= getattr(s, name) < 65536:
            problems.append(f"CRS_{name.upper()} must be 0-65535 (got {getattr(s, name)})")
    if not 0 <= s.jwt_leeway <= 300:   # past minutes, a typo (86400) would take tokens a day after they expired
        problems.append(f"CRS_JWT_LEEWAY must be 0 to 300 seconds (got {s.jwt_leeway})")
    if s.keepalive_time <= 0 or s.keepalive_timeout <= 0:
        problems.append("CRS_KEEPALIVE_TIME and CRS_KEEPALIVE_TIMEOUT must be > 0 seconds")
    if s.serving_model not in SERVING_MODELS:
        problems.append(f"CRS_SERVING_MODEL must be {' or '.join(SERVING_MODELS)} (got {s.serving_model!r})")
    if s.serving_threads < 4:
        problems.append(f"CRS_SERVING_THREADS must be >= 4 (got {s.serving_threads})")
    if s.serving_active < 1:
        problems.append(f"CRS_SERVING_ACTIVE must be >= 1 (got {s.serving_active})")
    if not 0 <= s.shed_queue_ms <= 1000:
        problems.append(f"CRS_SHED_QUEUE_MS must be 0 (off) to 1000 milliseconds (got {s.shed_queue_ms})")
    if s.message_wait_ms != 0 and not 100 <= s.message_wait_ms <= 60_000:
        problems.append(f"CRS_MESSAGE_WAIT_MS must be 0 (off) or 100 to 60000 milliseconds (got {s.message_wait_ms})")
    if s.batch_max > 5000:   # ~170 bytes a key at most: a batch must fit in rpc.MAX_REQUEST_BYTES (1 MiB)
        problems.append(f"CRS_BATCH_MAX must be at most 5000 keys, what a 1 MiB request holds (got {s.batch_max})")
    if s.loop_stall_seconds != 0 and not 3 <= s.loop_stall_seconds <= 3600:
        problems.append(f"CRS_LOOP_STALL_SECONDS must be 0 (off) or 3 to 3600 seconds (got {s.loop_stall_seconds})")
    if s.reinvalidate_delay <= s.redis_timeout:
        problems.append(f"CRS_REINVALIDATE_DELAY must exceed CRS_REDIS_TIMEOUT ({s.redis_timeout} s): a cache-miss"
                        " answer is cached only if its read and fill end within the difference (docs/decisions.md,"
                        f" \"Slow reads\"; got {s.reinvalidate_delay})")
    if s.cache_preferred_copy and not re.fullmatch(r"primary|replica-[1-9][0-9]*", s.cache_preferred_copy):
        problems.append(f"CRS_CACHE_PREFERRED_COPY must be primary or replica-N (got {s.cache_preferred_copy!r})")
    if s.pg_read_dsn and s.pg_position_interval * 2 >= fill_window_of(s):
        problems.append("with CRS_PG_READ_DSN, CRS_PG_POSITION_INTERVAL must be under half of CRS_REINVALIDATE_DELAY"
                        " - CRS_REDIS_TIMEOUT: a replica's answer is cached only within that window of a primary"
                        " position it has replayed (docs/deploy.md)")
    if not 0 < s.grpc_port < 65536:
        problems.append(f"CRS_GRPC_PORT must be 1-65535 (got {s.grpc_port})")
    if s.pg_pool_min > s.pg_pool_max:
        problems.append("CRS_PG_POOL_MIN must be <= CRS_PG_POOL_MAX")
    if s.feed_catch_up_reads >= s.pg_pool_max:   # 0 (the default) passes
        problems.append(f"CRS_FEED_CATCH_UP_READS must be below CRS_PG_POOL_MAX ({s.pg_pool_max}): each holds a"
                        f" connection, and lookups' misses need the rest (got {s.feed_catch_up_reads})")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"CRS_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR (got {s.log_level!r})")
    for name in ("topology_poll_interval", "migration_rate", "migration_batch"):
        if getattr(s, name) <= 0:
            problems.append(f"CRS_{name.upper()} must be > 0 (got {getattr(s, name)})")
    if s.topology_lease < 3 * s.topology_poll_interval:
        problems.append(f"CRS_TOPOLOGY_LEASE must be >= 3 x CRS_TOPOLOGY_POLL_INTERVAL (got {s.topology_lease})")
    if s.shard_stats_interval < 0:
        problems.append("CRS_SHARD_STATS_INTERVAL must be >= 0")
    if not 0 < s.identity_review_threshold <= s.identity_match_threshold < 1:
        problems.append("CRS_IDENTITY_REVIEW_THRESHOLD and CRS_IDENTITY_MATCH_THRESHOLD need"
                        f" 0 < review <= match < 1 (got {s.identity_review_threshold}, {s.identity_match_threshold})")
    try:
        parse_network_codes(s.decision_network_codes)
    except ValueError as exc:
        problems.append(f"CRS_DECISION_NETWORK_CODES: {exc}")
    if s.identity_possible_match not in ("review", "refuse"):
        problems.append(f"CRS_IDENTITY_POSSIBLE_MATCH must be review or refuse (got {s.identity_possible_match!r})")
    if problems:
        raise SettingsError("invalid configuration: " + "; ".join(problems))


def streams_per_client_of(s: Settings) -> int:
    """The open streams one client may hold on a node process, unless its clients-file entry says."""
    return s.streams_per_client or max(1, s.stream_threads - s.stream_threads // 4)


CATCH_UP_READS = 4   # the default of CRS_FEED_CATCH_UP_READS (docs/feed.md: 128 clients' Watches catching up)


def catch_up_reads_of(s: Settings) -> int:
    """How many Watches behind the live tail read from the table and deliver what they read at once on a
    node process."""
    return s.feed_catch_up_reads or max(1, min(CATCH_UP_READS, s.pg_pool_max // 2))


def fill_window_of(s: Settings) -> float:
    """How long after its snapshot a cache-miss answer may still be cached (a primary read's start,
    or the primary position a replica's answer covers): the relay's second delete comes
    `reinvalidate_delay` after a commit, less one Redis command's time for the fill itself
    (server/store/read_route.py)."""
    return s.reinvalidate_delay - s.redis_timeout


def check_serving(s: Settings) -> None:
    """What a node needs beyond what every command needs: a database, keys and a transport decision."""
    problems = []
    if not s.pg_dsn:
        problems.append("CRS_PG_DSN is not set: the node needs its PostgreSQL database")
    if not s.tls_cert_file and not s.allow_plaintext:
        problems.append("CRS_TLS_CERT_FILE is not set: configure TLS, or set CRS_ALLOW_PLAINTEXT=true (dev only)")
    if problems:
        raise SettingsError("invalid configuration: " + "; ".join(problems))
    s.keyring()


def load_settings(environ: Mapping[str, str], *, config_file: Path | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build and validate Settings from a config file, the environment and explicit overrides."""
    values: dict[str, Any] = {}
    defaults = {f.name: f.default for f in fields(Settings)}
    path = config_file or (Path(environ["CRS_CONFIG"]) if environ.get("CRS_CONFIG") else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {path}: {exc}") from exc
        for key, raw in data.items():
            if key not in defaults:
                raise SettingsError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw, defaults[key])
    for name, default in defaults.items():
        env_name = _ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = _coerce(name, environ[env_name], default)
        file_var = _FILE_VARIANTS.get(name)
        if file_var and environ.get(file_var) and env_name in environ:
            # Either could be meant: an override of a mounted file (an operator's login in a node's pod)
            # silently losing to the file ran with the node's login.
            raise SettingsError(f"{env_name} and {file_var} are both set: set one (to use {env_name} where a"
                                f" file is mounted: env -u {file_var} {env_name}=... crs ...)")
        if file_var and environ.get(file_var):
            try:
                values[name] = Path(environ[file_var]).read_text().strip()
            except OSError as exc:
                raise SettingsError(f"{file_var}: cannot read {environ[file_var]}: {exc.strerror}") from exc
    for key, raw in (overrides or {}).items():
        values[key] = _coerce(key, raw, defaults[key])
    settings = Settings(**values)
    _validate(settings)
    return settings


# CRS_* variables that are not settings: read by the command line, the node's own workers, the tests.
_OTHER_VARIABLES = frozenset({"CRS_CONFIG", "CRS_WORKER_INDEX", "CRS_PG_BINDIR"})
_OTHER_PREFIXES = ("CRS_TEST_",)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The CRS_* variables in `environ` that nothing reads, each with the setting it may have meant
    ("CRS_REDIS_SHARD (CRS_REDIS_SHARDS?)"): names only, never a value. A typo was silently ignored,
    the setting then taking its default."""
    import difflib

    known = {_ENV_PREFIX + f.name.upper() for f in fields(Settings)} | set(_FILE_VARIANTS.values()) | _OTHER_VARIABLES
    out = []
    for name in sorted(environ):
        if not name.startswith(_ENV_PREFIX) or name in known or name.startswith(_OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        out.append(f"{name} ({close[0]}?)" if close else name)
    return out


def settings_to_env(s: Settings) -> dict[str, str]:
    """The environment that reproduces `s` in a child process (used to start node workers)."""
    env: dict[str, str] = {}
    for f in fields(Settings):
        value = getattr(s, f.name)
        env[_ENV_PREFIX + f.name.upper()] = format_shards(value) if f.name == "redis_shards" else str(value)
    return env
