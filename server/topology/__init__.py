"""The shard topology's I/O: where it is stored and watched, how a move is driven, shard stats.

The rules themselves (ring, topology states, move plans) are pure and live in shard_router/;
this package reads and writes them in PostgreSQL (or a file), follows them in every node, and
warms the keys a move hands to a new owner.

    store         the versioned topology, the staged change and the move's progress (PostgreSQL or file)
    watch         a node's follower: poll, swap the ring, heartbeat
    staging       the topology to start from, the first published version, the staged change
    migrator      crs shards apply/abort: the move driver (publish steps, wait for nodes, one driver)
    key_steps     a step's keys: flush joining shards, copy moved keys, clean up old owners (paced, resumable)
    policy        MigrationPolicy: rate, batch, waits and timeouts of a move, from the settings
    errors        MigrationError and ShardUnreachable: why a topology command stops
    report        what `crs shards status` and `plan` report: gathered, typed, with their JSON form
    shard_stats   INFO of each shard for metrics and `crs shards status`
"""
