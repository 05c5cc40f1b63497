-- 0002: the Redis shard topology (the source of truth every node reads), the operator's staged change,
-- the resharding warmer's resumable progress, and a heartbeat per node process.
-- docs/runbooks/resharding.md explains how they are used.

-- Append-only history: the row with the highest version is the topology in force. A new version is
-- published only as current + 1 (the primary key turns a concurrent publish into a conflict).
CREATE TABLE shard_topology (
    version      bigint PRIMARY KEY CHECK (version > 0),
    document     jsonb NOT NULL,             -- shard_router.topology.Topology.to_document()
    reason       text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by   text NOT NULL DEFAULT current_user
);

-- The change an operator is preparing (crs shards add/remove/reweight), not yet seen by any node.
CREATE TABLE shard_topology_draft (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    base_version  bigint NOT NULL,           -- the stable version the draft was staged against
    shards        jsonb NOT NULL,            -- the target shard list
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_by    text NOT NULL DEFAULT current_user
);

-- Where the warmer (step 'copy') or the cleanup (step 'cleanup') of a topology version stands on each
-- source shard, so an interrupted `crs shards apply` resumes instead of starting over.
CREATE TABLE shard_migration_progress (
    topology_version  bigint NOT NULL,
    step              text NOT NULL CHECK (step IN ('copy', 'cleanup')),
    shard             text NOT NULL,
    scan_cursor       text NOT NULL DEFAULT '0',   -- Redis SCAN cursor (an unsigned 64-bit number)
    scanned           bigint NOT NULL DEFAULT 0,
    moved             bigint NOT NULL DEFAULT 0,   -- copied (copy) or deleted (cleanup)
    skipped           bigint NOT NULL DEFAULT 0,   -- already present on the new owner, or too slow to keep
    done              boolean NOT NULL DEFAULT false,
    started_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topology_version, step, shard)
);

-- One row per live node process: the topology version it runs (the health detail `crs shards status`
-- shows, and what `crs shards apply` waits on before each step). Removed when a node stops cleanly.
CREATE TABLE node_status (
    node_id           text PRIMARY KEY,        -- host/pid
    address           text NOT NULL,           -- gRPC address it serves
    topology_version  bigint NOT NULL,
    phase             text NOT NULL,
    ring              text NOT NULL,           -- the ring it reads from, 'shard-0:1,shard-1:1,...'
    shards_down       text[] NOT NULL DEFAULT '{}',
    shard_errors      jsonb NOT NULL DEFAULT '{}'::jsonb,   -- shard -> failed Redis operations since start
    started_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    seen_at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX node_status_seen ON node_status (seen_at);
