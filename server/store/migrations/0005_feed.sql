-- 0005: the change feed. Every outbox row gets a feed sequence drawn at commit time under one
-- transaction-level advisory lock (server/store/envelope.py), so sequence order is commit order and
-- the rows a reader can see are always a prefix of the sequence: `seq > last` never skips a row
-- that commits later (docs/decisions.md, "Change feed"). The row also keeps the entity's state
-- after the change (the serialized, masked message a Watch delivers) and its version.

CREATE SEQUENCE feed_seq;

-- Every column is added without a rewrite or a backfill: rows written before this migration keep
-- seq NULL and are not part of the feed (consumers start from a Snapshot). The default lets a node
-- of the previous release, which does not know the column, keep writing during a rolling upgrade;
-- its rows get a sequence drawn at insert (not under the feed lock, and without state), so the feed
-- guarantees hold for what the new release writes: finish the rollout before consumers start.
ALTER TABLE outbox
    ADD COLUMN seq          bigint,
    ADD COLUMN feed_type    smallint NOT NULL DEFAULT 0,   -- crs.v1.EntityType
    ADD COLUMN feed_op      smallint NOT NULL DEFAULT 0,   -- crs.v1.Operation
    ADD COLUMN feed_id      text NOT NULL DEFAULT '',      -- the entity id the event names
    ADD COLUMN feed_version bigint NOT NULL DEFAULT 0,
    ADD COLUMN state        bytea;                         -- the entity message after the change
ALTER TABLE outbox ALTER COLUMN seq SET DEFAULT nextval('feed_seq');
CREATE UNIQUE INDEX outbox_seq ON outbox (seq) WHERE seq IS NOT NULL;

-- Compaction (server/store/feed.py) deletes settled rows older than the retention window and
-- records how far it went: a Watch from below that point answers OUT_OF_RANGE.
CREATE TABLE feed_horizon (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    compacted_through  bigint NOT NULL DEFAULT 0,
    compacted_at       timestamptz
);
INSERT INTO feed_horizon DEFAULT VALUES;

-- Nodes read and move the horizon; they never add or remove its one row.
GRANT SELECT, UPDATE ON feed_horizon TO crs_app;
REVOKE INSERT, DELETE, TRUNCATE ON feed_horizon FROM crs_app;
GRANT USAGE, SELECT ON SEQUENCE feed_seq TO crs_app;
