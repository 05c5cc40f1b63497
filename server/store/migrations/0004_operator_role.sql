-- 0004: the shard topology is changed by operators (crs shards ...), not by node processes.
-- Nodes (crs_app) keep reading it and keep writing their own heartbeat in node_status; publishing a
-- topology, staging a change and recording the warmer's progress need crs_operator, which also holds
-- everything crs_app may do (key rotation, audit queries).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'crs_operator') THEN
        CREATE ROLE crs_operator NOLOGIN IN ROLE crs_app;
    END IF;
END
$$;
REVOKE INSERT, UPDATE, DELETE ON shard_topology, shard_topology_draft, shard_migration_progress FROM crs_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON shard_topology, shard_topology_draft, shard_migration_progress
    TO crs_operator;
