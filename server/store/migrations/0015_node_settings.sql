-- 0015: each node reports the settings a topology driver must honour for it (docs/audit-2026-12-04.md,
-- shards 8 and 9). `lease_s`: its CRS_TOPOLOGY_LEASE (it heartbeats every third of it), so `crs shards
-- apply` presumes it gone only after its own lease, not the command's shorter one. `reinvalidate_delay_s`:
-- its CRS_REINVALIDATE_DELAY, so the warmer keeps a copied value only within half of every node's.
-- `bootstrap_shards`: the shard list of its CRS_REDIS_SHARDS (servers only, never a password), which the
-- first published version must name. NULL from nodes older than this migration: the command's own.
ALTER TABLE node_status ADD COLUMN lease_s double precision;
ALTER TABLE node_status ADD COLUMN reinvalidate_delay_s double precision;
ALTER TABLE node_status ADD COLUMN bootstrap_shards text;
