"""Pure consistent-hash routing of keys to Redis shards, key-for-key compatible with twemproxy ketama."""

from shard_router.ring import Ring, ShardSpec

__all__ = ["Ring", "ShardSpec"]
