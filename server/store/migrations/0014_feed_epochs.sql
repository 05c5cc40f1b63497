-- 0014: feed epochs. Feed sequences come from feed_seq, and a database restored from a backup (or a
-- failover that lost commits) hands out the sequences after its restored head again, for other
-- changes. An epoch names one history of the database, so that a consumer's checkpoint from a history
-- this database no longer has is refused instead of resumed (docs/feed.md, "a restored database").
--
-- The epoch is derived from PostgreSQL, never remembered: the cluster's system identifier (a new one
-- for a logical restore into a fresh cluster) and the timeline WAL is written on (a new one after a
-- point-in-time restore or a standby's promotion). The timeline is read from the name of the current
-- WAL file, not from pg_control_checkpoint(): a promoted standby writes on its new timeline at once,
-- but its control file names the old one until its first checkpoint, which may be minutes later.
-- Both functions are executable by PUBLIC in stock PostgreSQL: the nodes' role needs no grant. On a
-- standby pg_walfile_name() raises (recovery is in progress); the feed is read from the primary.
-- The system identifier is written in hex: in decimal it has 19 digits, which pass the Luhn check one
-- time in ten and would then be masked in logs, and flagged by card-number scanners, as a PAN.
CREATE FUNCTION feed_current_epoch() RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT to_hex((SELECT system_identifier FROM pg_control_system())) || '/'
        || ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint::text
$$;

-- Every epoch this history went through, with the first sequence handed out in it. The table comes
-- back with a physical restore, so the restored database lists the epochs of its own past, and the
-- new epoch's row is written by the first thing that sees it (below).
CREATE TABLE feed_epochs (
    epoch           text PRIMARY KEY,
    first_sequence  bigint NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now()
);

-- The current epoch, recorded first if it is new, with first_sequence = the database's head + 1: every
-- sequence below it is common to the new history and the one it came from. Taken under the feed lock
-- (server/store/envelope.py FEED_LOCK, 0x43525346) so no feed row commits between reading the head and
-- recording it; idempotent across nodes.
CREATE FUNCTION feed_epoch() RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    current_epoch text := feed_current_epoch();
BEGIN
    IF NOT EXISTS (SELECT FROM feed_epochs WHERE epoch = current_epoch) THEN
        PERFORM pg_advisory_xact_lock(1129468742);
        INSERT INTO feed_epochs (epoch, first_sequence)
            SELECT current_epoch, greatest((SELECT coalesce(max(seq), 0) FROM outbox), h.compacted_through) + 1
            FROM feed_horizon h
            ON CONFLICT (epoch) DO NOTHING;
    END IF;
    RETURN current_epoch;
END
$$;

-- Whatever writes the feed (every node release, a tool, a test) records a new epoch before its row can
-- commit: the fork point is then exact however the first write after a restore arrives.
CREATE FUNCTION feed_epoch_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM feed_epoch();
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_feed_epoch BEFORE INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION feed_epoch_before_insert();

-- Nodes record epochs; nobody rewrites them.
REVOKE ALL ON feed_epochs FROM crs_app;
GRANT SELECT, INSERT ON feed_epochs TO crs_app;

SELECT feed_epoch();
