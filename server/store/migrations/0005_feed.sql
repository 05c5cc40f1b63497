-- 0005: the change feed. Every outbox row gets a feed sequence drawn at commit time under one
-- transaction-level advisory lock (server/store/envelope.py), so sequence order is commit order and
-- the rows a reader can see are always a prefix of the sequence: `seq > last` never skips a row
-- that commits later (docs/decisions.md, "Change feed"). The row also keeps the entity's state
-- after the change (the serialized, masked message a Watch delivers) and its version.

CREATE SEQUENCE feed_seq;

ALTER TABLE outbox
    ADD COLUMN seq          bigint,
    ADD COLUMN feed_type    smallint NOT NULL DEFAULT 0,   -- crs.v1.EntityType
    ADD COLUMN feed_op      smallint NOT NULL DEFAULT 0,   -- crs.v1.Operation
    ADD COLUMN feed_id      text NOT NULL DEFAULT '',      -- the entity id the event names
    ADD COLUMN feed_version bigint NOT NULL DEFAULT 0,
    ADD COLUMN state        bytea;                         -- the entity message after the change

-- Rows written before this migration: in id order (they committed before any feed existed).
WITH ordered AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM outbox)
UPDATE outbox o SET seq = ordered.n FROM ordered WHERE o.id = ordered.id;
SELECT setval('feed_seq', greatest((SELECT max(seq) FROM outbox), 1), (SELECT count(*) > 0 FROM outbox));

ALTER TABLE outbox ALTER COLUMN seq SET NOT NULL;
CREATE UNIQUE INDEX outbox_seq ON outbox (seq);

-- Compaction (server/feed/retention.py) deletes settled rows older than the retention window and
-- records how far it went: a Watch from below that point answers OUT_OF_RANGE.
CREATE TABLE feed_horizon (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    compacted_through  bigint NOT NULL DEFAULT 0,
    compacted_at       timestamptz
);
INSERT INTO feed_horizon DEFAULT VALUES;

GRANT SELECT, UPDATE ON feed_horizon TO crs_app;
GRANT USAGE, SELECT ON SEQUENCE feed_seq TO crs_app;
