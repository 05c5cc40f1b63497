-- 0013: the outbox relay takes rows never tried before the ones it tried longest ago. A row whose delete
-- a down shard never acknowledges stays unsettled; ordered by id alone, once a batch (500) of them
-- was owed, every pass took the same rows and no newer write got its second delete, on any shard.
ALTER TABLE outbox ADD COLUMN attempted_at timestamptz;
CREATE INDEX outbox_relay_order ON outbox (attempted_at NULLS FIRST, id) WHERE settled_at IS NULL;
