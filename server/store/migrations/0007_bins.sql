-- 0007: the BIN table (docs/bins.md): issuer identification number ranges for routing cards that
-- are not ours. Each import is a new version; exactly one version is active; older versions are
-- kept so that an operator can switch back (`crs bins activate N`). Nodes poll the active version
-- and rebuild their in-memory index when it changes.

CREATE TABLE bin_tables (
    version       integer PRIMARY KEY,
    active        boolean NOT NULL DEFAULT false,
    source_file   text NOT NULL,
    sha256        text NOT NULL,
    ranges        integer NOT NULL,
    rejected      integer NOT NULL,
    imported_at   timestamptz NOT NULL DEFAULT now(),
    activated_at  timestamptz
);
CREATE UNIQUE INDEX bin_tables_one_active ON bin_tables (active) WHERE active;

CREATE TABLE bin_ranges (
    version         integer NOT NULL REFERENCES bin_tables (version) ON DELETE CASCADE,
    low             text NOT NULL,
    high            text NOT NULL,
    pan_length      smallint NOT NULL,
    network         text NOT NULL,
    issuer_name     text NOT NULL,
    issuer_country  char(2) NOT NULL,
    product         text NOT NULL,
    on_us           boolean NOT NULL
);
CREATE INDEX bin_ranges_by_version ON bin_ranges (version);
