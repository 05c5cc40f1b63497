"""The shard topology's I/O: where it is stored and watched, how a move is driven, shard stats.

The rules themselves (ring, topology states, move plans) are pure and live in shard_router/;
this package reads and writes them in PostgreSQL (or a file), follows them in every node, and
warms the keys a move hands to a new owner.

    store         the versioned topology, the staged change and the move's progress (PostgreSQL or file)
    watch         a node's follower: poll, swap the ring, heartbeat
    migrator      crs shards apply/abort: publish steps, wait for nodes, copy and clean up keys
    shard_stats   INFO of each shard for metrics and `crs shards status`
"""
