-- 0010: when a BIN table version stopped being the active one. Card answers are cached under the BIN
-- table version they were built with (server/cache_keys.py); an invalidation deletes a card's keys
-- under every version whose answers may still be cached: the active one and those deactivated
-- within the cache TTL.
ALTER TABLE bin_tables ADD COLUMN deactivated_at timestamptz;
