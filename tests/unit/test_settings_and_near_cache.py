"""Settings parsing/validation and the near-cache (pure, no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cache.near import NearCache
from server.cache_keys import NEGATIVE
from server.crypto import encode_key, new_key
from server.settings import SettingsError, fill_window_of, load_settings, settings_to_env
from shard_router.addresses import ShardListError, parse_shards


def test_defaults_and_env_override() -> None:
    s = load_settings({"CRS_GRPC_PORT": "6000", "CRS_NEAR_CACHE_TTL": "0.5"})
    assert s.grpc_port == 6000 and s.near_cache_ttl == 0.5 and s.batch_max == 1000


def test_every_bad_value_is_named() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"CRS_PG_POOL_MAX": "0", "CRS_CACHE_TTL_JITTER": "2", "CRS_LOG_LEVEL": "LOUD"})
    text = str(info.value)
    assert "CRS_PG_POOL_MAX" in text and "CRS_CACHE_TTL_JITTER" in text and "CRS_LOG_LEVEL" in text
    with pytest.raises(SettingsError, match="CRS_GRPC_PORT='x'"):
        load_settings({"CRS_GRPC_PORT": "x"})
    # A batch must fit the node's bound on a request (server/rpc.py MAX_REQUEST_BYTES); the stall limit
    # must leave the loop a few beats.
    with pytest.raises(SettingsError) as info:
        load_settings({"CRS_BATCH_MAX": "5001", "CRS_LOOP_STALL_SECONDS": "2"})
    assert "CRS_BATCH_MAX must be at most 5000" in str(info.value) and "CRS_LOOP_STALL_SECONDS" in str(info.value)
    assert load_settings({"CRS_BATCH_MAX": "5000", "CRS_LOOP_STALL_SECONDS": "0"}).batch_max == 5000


def test_config_file_env_wins_and_unknown_keys_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "crs.toml"
    cfg.write_text('grpc_port = 7000\nbatch_max = 10\n')
    s = load_settings({"CRS_BATCH_MAX": "20"}, config_file=cfg)
    assert s.grpc_port == 7000 and s.batch_max == 20
    cfg.write_text('grpc_prot = 7000\n')
    with pytest.raises(SettingsError, match="unknown setting 'grpc_prot'"):
        load_settings({}, config_file=cfg)


def test_shards_parse_and_round_trip() -> None:
    shards = parse_shards("shard-0=redis://127.0.0.1:1/0, shard-1=redis://127.0.0.1:2/0;weight=2")
    assert [(s.name, s.weight) for s in shards] == [("shard-0", 1), ("shard-1", 2)]
    with pytest.raises(ShardListError, match="unique"):
        parse_shards("a=redis://x:1/0,a=redis://x:2/0")
    with pytest.raises(ShardListError, match="weight"):
        parse_shards("a=redis://x:1/0;weight=0")


def test_secrets_stay_out_of_repr_and_keys_checked(tmp_path: Path) -> None:
    kek = encode_key(new_key())
    fp = f"1:{encode_key(new_key())}"
    s = load_settings({"CRS_KEK": kek, "CRS_FINGERPRINT_KEYS": fp, "CRS_PG_DSN": "postgresql://u:secretpw@h/db"})
    assert kek not in repr(s) and "secretpw" not in repr(s)
    assert s.keyring().fingerprint_version == 1
    assert load_settings(settings_to_env(s)) == s
    secret_file = tmp_path / "kek"
    secret_file.write_text(kek + "\n")
    assert load_settings({"CRS_KEK_FILE": str(secret_file), "CRS_FINGERPRINT_KEYS": fp}).keyring()
    with pytest.raises(SettingsError, match="CRS_KEK"):
        load_settings({"CRS_KEK": "short", "CRS_FINGERPRINT_KEYS": fp}).keyring()


def test_a_value_and_its_file_variant_together_are_refused(tmp_path: Path) -> None:
    """The runbooks' in-cluster `crs shards` with an operator's CRS_PG_DSN, in a pod whose CRS_PG_DSN_FILE
    holds the node's login, ran as the node (the file silently won). Both set: one line naming both,
    never a value; either alone is taken."""
    mounted = tmp_path / "dsn"
    mounted.write_text("postgresql://crs_node:nodepw@h/db\n")
    both = {"CRS_PG_DSN": "postgresql://operator:operatorpw@h/db", "CRS_PG_DSN_FILE": str(mounted)}
    with pytest.raises(SettingsError, match="CRS_PG_DSN and CRS_PG_DSN_FILE are both set") as info:
        load_settings(both)
    assert "pw" not in str(info.value) and "env -u CRS_PG_DSN_FILE" in str(info.value)
    assert load_settings({"CRS_PG_DSN_FILE": str(mounted)}).pg_dsn == "postgresql://crs_node:nodepw@h/db"
    assert load_settings({**both, "CRS_PG_DSN_FILE": ""}).pg_dsn == "postgresql://operator:operatorpw@h/db"


def test_near_cache_lru_ttl_and_discard() -> None:
    now = [0.0]
    cache = NearCache(max_entries=2, ttl=1.0, clock=lambda: now[0])
    cache.put("a", b"1")
    cache.put("b", b"2")
    assert cache.get("a") == b"1"          # a is now most recent
    cache.put("c", b"3")                   # evicts b
    assert cache.get("b") is None and cache.get("a") == b"1" and cache.evictions == 1
    now[0] = 1.5
    assert cache.get("a") is None          # expired
    cache.put("d", b"4")
    cache.discard(["d", "zz"])
    assert cache.get("d") is None
    off = NearCache(max_entries=0, ttl=1.0)
    off.put("a", b"1")
    assert off.get("a") is None and not off.enabled


def test_unknown_keys_do_not_push_the_hot_answers_out() -> None:
    """Card testing through a switch (random card numbers) or a scanner: every key is new and matches
    nothing. Negative entries used to share the one LRU, so such a stream evicted every hot answer in
    max_entries / rate seconds (each hot card then a Redis round trip). Now they take at most a tenth of
    the entries, evicting each other."""
    cache = NearCache(max_entries=100, ttl=60)
    hot = [f"crd:1:hot{i}" for i in range(100)]
    for key in hot:
        cache.put(key, b"answer " + key.encode())
    for n in range(10_000):
        cache.put(f"crd:1:unknown{n}", NEGATIVE)
    kept = [key for key in hot if cache.get(key) == b"answer " + key.encode()]
    assert len(kept) == 90 and kept == hot[10:], "only the tenth the negatives may hold was evicted"
    assert len(cache) == 100
    assert [cache.get(f"crd:1:unknown{n}") for n in range(9_990, 10_000)] == [NEGATIVE] * 10
    assert cache.get("crd:1:unknown0") is None
    # A key that changes kind is found as it is now, once: an answer that became NOT_FOUND and back.
    cache.put(hot[50], NEGATIVE)
    assert cache.get(hot[50]) == NEGATIVE
    cache.put(hot[50], b"issued again")
    assert cache.get(hot[50]) == b"issued again" and len(cache) == 99   # one negative went for it
    cache.discard([hot[50], "crd:1:unknown9999"])
    assert cache.get(hot[50]) is None and cache.get("crd:1:unknown9999") is None
    cache.clear()
    assert len(cache) == 0


def test_serving_model_is_aio_or_hybrid() -> None:
    assert load_settings({}).serving_model == "hybrid"
    assert load_settings({"CRS_SERVING_MODEL": "aio"}).serving_model == "aio"
    with pytest.raises(SettingsError) as info:
        load_settings({"CRS_SERVING_MODEL": "threads", "CRS_SERVING_THREADS": "2"})
    assert "CRS_SERVING_MODEL" in str(info.value) and "CRS_SERVING_THREADS" in str(info.value)
    assert load_settings({}).redis_thread_connections == 8
    assert load_settings({"CRS_REDIS_THREAD_CONNECTIONS": "0"}).redis_thread_connections == 0   # all on the loop
    with pytest.raises(SettingsError, match="CRS_REDIS_THREAD_CONNECTIONS must be >= 0"):
        load_settings({"CRS_REDIS_THREAD_CONNECTIONS": "-1"})


def test_the_fill_window_must_be_positive() -> None:
    """A miss's answer is cached only within CRS_REINVALIDATE_DELAY - CRS_REDIS_TIMEOUT of its read:
    a delay at or under the Redis timeout would silently cache nothing."""
    assert fill_window_of(load_settings({})) == pytest.approx(0.25)
    for delay in ("0.25", "0.1"):
        with pytest.raises(SettingsError, match="CRS_REINVALIDATE_DELAY must exceed CRS_REDIS_TIMEOUT"):
            load_settings({"CRS_REINVALIDATE_DELAY": delay})
    assert fill_window_of(load_settings({"CRS_REINVALIDATE_DELAY": "0.3", "CRS_REDIS_TIMEOUT": "0.1"})) \
        == pytest.approx(0.2)


def test_near_cache_stays_consistent_under_threads() -> None:
    """The hybrid model reads the near-cache on gRPC threads while the loop fills and invalidates it:
    concurrent get/put/discard never raise, never exceed the bound, and a value read is one that was put."""
    import threading

    cache = NearCache(max_entries=64, ttl=60)
    errors: list[BaseException] = []
    values = {f"k{i}": f"v{i}".encode() for i in range(200)}

    def work(seed: int) -> None:
        try:
            for n in range(5_000):
                key = f"k{(n * 7 + seed) % 200}"
                if n % 3 == 0:
                    cache.put(key, values[key])
                elif n % 3 == 1:
                    got = cache.get(key)
                    assert got is None or got == values[key]
                else:
                    cache.discard([key])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cache) <= 64
    assert cache.size_bytes == sum(len(entry[1]) for entry in cache._data.values())   # counted as held


def test_near_cache_holds_at_most_its_bytes_of_answers() -> None:
    """Bounded by entries alone, 100,000 profiles of 200 KB would be 20 GB in one process. Past
    `max_bytes` the least recently used answers go; one bigger than the bound is served, not kept."""
    now = [0.0]
    cache = NearCache(max_entries=1000, ttl=60, max_bytes=10_000, clock=lambda: now[0])
    for i in range(10):
        cache.put(f"p{i}", bytes(1500))                  # 15,000 bytes asked to be held
    assert cache.size_bytes <= 10_000 and len(cache) == 6
    assert cache.get("p0") is None and cache.get("p9") == bytes(1500)   # the oldest went first
    cache.put("p9", bytes(100))                          # replaced: its old size no longer counts
    assert cache.size_bytes == 5 * 1500 + 100
    cache.put("big", bytes(10_001))
    assert cache.get("big") is None and cache.size_bytes == 7_600
    cache.put("p8", NEGATIVE)                            # an answer that became NOT_FOUND
    assert cache.size_bytes == 6_100
    cache.discard(["p7", "p6"])
    assert cache.size_bytes == 3_100
    now[0] += 61                                        # expired entries leave as they are read
    assert cache.get("p5") is None and cache.size_bytes == 1_600
    cache.clear()
    assert cache.size_bytes == 0 and len(cache) == 0
    with pytest.raises(SettingsError, match="CRS_NEAR_CACHE_BYTES must be > 0"):
        load_settings({"CRS_NEAR_CACHE_BYTES": "0"})


def test_near_cache_refresh_ahead_is_due_once_per_entry() -> None:
    """A hit in an entry's last `refresh` seconds is due for a reload once; the entry still answers
    until its expiry (never past it), and a put, discard or expiry starts the count again."""
    now = [0.0]
    cache = NearCache(max_entries=8, ttl=1.0, refresh=0.25, clock=lambda: now[0])
    cache.put("a", b"1")                       # expires at 0.8-1.0 s (jitter), due from 0.55-0.75 s
    assert cache.read("a") == (b"1", False)
    now[0] = 0.76
    assert cache.read("a") == (b"1", True)     # due: handed out once
    assert cache.read("a") == (b"1", False)
    assert cache.get("a") == b"1"
    cache.put("a", b"2")                       # the refresh landed: a fresh entry, not due
    assert cache.read("a") == (b"2", False)
    now[0] = 0.76 + 0.76
    assert cache.read("a") == (b"2", True)
    cache.discard(["a"])
    cache.put("a", b"3")
    now[0] += 0.76
    assert cache.read("a") == (b"3", True)     # discard forgot the handed-out refresh
    now[0] += 0.3
    assert cache.read("a") == (None, False)    # expired: no answer, refresh or not
    never = NearCache(max_entries=8, ttl=1.0, clock=lambda: now[0])
    never.put("b", b"1")
    now[0] += 0.79
    assert never.read("b") == (b"1", False)    # refresh=0: off
    with pytest.raises(ValueError):
        NearCache(max_entries=8, ttl=1.0, refresh=0.8)   # would be due as soon as filled
    with pytest.raises(SettingsError, match="CRS_NEAR_CACHE_REFRESH"):
        load_settings({"CRS_NEAR_CACHE_REFRESH": "0.9"})


def test_unknown_crs_variables_are_named_with_what_they_may_mean() -> None:
    from server.settings import unknown_variables

    environ = {"CRS_REDIS_SHARD": "s=redis://x:1/0", "CRS_PG_DSN": "postgresql://u@h/db", "CRS_KEK_FILE": "/k",
               "CRS_CONFIG": "/c.toml", "CRS_TEST_SERVING_MODEL": "aio", "CRS_BOGUS": "1", "PATH": "/bin",
               "CRS_CACHE_TLL": "30"}
    assert unknown_variables(environ) == ["CRS_BOGUS", "CRS_CACHE_TLL (CRS_CACHE_TTL?)",
                                          "CRS_REDIS_SHARD (CRS_REDIS_SHARDS?)"]


@pytest.mark.parametrize("toml", ['redis_shards = ["shard-0=redis://:pw@127.0.0.1:6379/0"]', "redis_shards = 4",
                                  'redis_shards = {shard-0 = "redis://:pw@127.0.0.1:6379/0"}'])
def test_redis_shards_in_a_config_file_is_one_string(tmp_path: Path, toml: str) -> None:
    """A TOML list or table used to pass through unparsed and fail later with a traceback."""
    cfg = tmp_path / "crs.toml"
    cfg.write_text(toml + "\n")
    with pytest.raises(SettingsError, match="CRS_REDIS_SHARDS: redis_shards in a config file must be one string"):
        load_settings({}, config_file=cfg)
    cfg.write_text('redis_shards = "shard-0=redis://127.0.0.1:6379/0"\n')
    assert [s.name for s in load_settings({}, config_file=cfg).redis_shards] == ["shard-0"]


def test_a_malformed_shard_list_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="CRS_REDIS_SHARDS: shard 'a': option 'weight=0'"):
        load_settings({"CRS_REDIS_SHARDS": "a=redis://x:1/0;weight=0"})


def test_shed_queue_ms_is_off_or_a_target_up_to_a_second() -> None:
    assert load_settings({}).shed_queue_ms == 5.0
    assert load_settings({"CRS_SHED_QUEUE_MS": "0"}).shed_queue_ms == 0.0     # never refuse
    for bad in ("-1", "1001"):
        with pytest.raises(SettingsError, match="CRS_SHED_QUEUE_MS must be 0 \\(off\\) to 1000"):
            load_settings({"CRS_SHED_QUEUE_MS": bad})


def test_serving_active_is_at_least_one_thread() -> None:
    assert load_settings({}).serving_active == 16
    assert load_settings({"CRS_SERVING_ACTIVE": "64"}).serving_active == 64     # every thread: no turns
    for bad in ("0", "-3"):
        with pytest.raises(SettingsError, match="CRS_SERVING_ACTIVE must be >= 1"):
            load_settings({"CRS_SERVING_ACTIVE": bad})


def test_the_jwt_leeway_is_minutes_at_most() -> None:
    """A leeway is clock slack: a typo of a day (86400) would take a token a day after it expired."""
    assert load_settings({"CRS_JWT_LEEWAY": "300"}).jwt_leeway == 300
    for wrong in ("-1", "86400"):
        with pytest.raises(SettingsError, match="CRS_JWT_LEEWAY must be 0 to 300 seconds"):
            load_settings({"CRS_JWT_LEEWAY": wrong})
    for name in ("CRS_MAX_CONNECTION_AGE", "CRS_DRAIN_DELAY"):
        with pytest.raises(SettingsError, match=f"{name} must be >= 0"):
            load_settings({name: "-1"})
