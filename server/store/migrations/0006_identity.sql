-- 0006: customer identity (docs/identity.md). One customer is one person: every source system's
-- record of that person is kept as it came (the crosswalk), the golden customer is computed from
-- them by the survivorship rules, and a merge only re-points records and relationships, so an
-- unmerge puts back exactly what was there.
--
-- No clear identity attribute is stored: a record's attributes are one AES-256-GCM ciphertext under
-- a data key (like PANs), the national id is also kept as a keyed fingerprint (its exact-match
-- index) and its last four, and the blocking keys candidate search uses are keyed hashes too.

-- A merged customer stays, as an alias that resolves to the survivor.
ALTER TABLE customers
    ADD COLUMN merged_into text REFERENCES customers (customer_id),
    ADD COLUMN merged_at   timestamptz;
CREATE INDEX customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE source_records (
    record_id             bigserial PRIMARY KEY,
    source_system         text NOT NULL,
    source_key            text NOT NULL,
    customer_id           text NOT NULL REFERENCES customers (customer_id),  -- the golden record now
    home_customer_id      text NOT NULL REFERENCES customers (customer_id),  -- the one it was filed under
    fingerprint_version   integer NOT NULL,
    national_id_fp        bytea,              -- HMAC of "TYPE:normalised id"; NULL when unknown
    national_id_last4     text,
    next_fingerprint_version integer,         -- during a fingerprint-key rotation (server/rotation.py)
    next_national_id_fp   bytea,
    attributes_ciphertext bytea NOT NULL,     -- the record's normalised attributes (JSON), encrypted
    dek_id                integer NOT NULL REFERENCES data_keys (dek_id),
    version               bigint NOT NULL DEFAULT 1,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_system, source_key)
);
CREATE INDEX source_records_by_customer ON source_records (customer_id);
CREATE INDEX source_records_by_national_id ON source_records (fingerprint_version, national_id_fp)
    WHERE national_id_fp IS NOT NULL;

-- Blocking keys: the first 8 bytes of a keyed hash of each comparison key of a record
-- (server/identity/blocking.py), under each configured fingerprint-key version (two during a
-- rotation). Candidate search reads the records sharing a key with the query.
CREATE TABLE identity_blocks (
    version    integer NOT NULL,
    block      bigint NOT NULL,
    record_id  bigint NOT NULL REFERENCES source_records (record_id) ON DELETE CASCADE,
    PRIMARY KEY (version, block, record_id)
);
CREATE INDEX identity_blocks_by_record ON identity_blocks (record_id);

-- One row per merge, with what it moved, so that an unmerge undoes exactly that.
CREATE TABLE customer_merges (
    merge_id        bigserial PRIMARY KEY,
    survivor_id     text NOT NULL REFERENCES customers (customer_id),
    merged_id       text NOT NULL REFERENCES customers (customer_id),
    record_ids      bigint[] NOT NULL,        -- source records moved to the survivor
    relationships   jsonb NOT NULL,           -- [{account_id, role, survivor_role}] moved (survivor_role: the
                                              -- survivor's role before, when it already had one)
    aliases         text[] NOT NULL,          -- customers merged into merged_id before, re-pointed
    merged_at       timestamptz NOT NULL DEFAULT now(),
    unmerged_at     timestamptz
);
CREATE UNIQUE INDEX customer_merges_active ON customer_merges (merged_id) WHERE unmerged_at IS NULL;

-- Possible matches waiting for a person, and pairs a person said are two people.
CREATE TABLE identity_reviews (
    review_id     text PRIMARY KEY,
    customer_id   text NOT NULL REFERENCES customers (customer_id),
    candidate_id  text NOT NULL REFERENCES customers (customer_id),
    probability   double precision NOT NULL,
    evidence      jsonb NOT NULL,
    status        smallint NOT NULL,          -- crs.v1.ReviewStatus
    created_at    timestamptz NOT NULL DEFAULT now(),
    decided_at    timestamptz
);
CREATE INDEX identity_reviews_open ON identity_reviews (created_at, review_id) WHERE status = 1;
CREATE UNIQUE INDEX identity_reviews_pair ON identity_reviews (LEAST(customer_id, candidate_id),
    GREATEST(customer_id, candidate_id)) WHERE status = 1;

CREATE TABLE identity_distinct (
    customer_a  text NOT NULL REFERENCES customers (customer_id),   -- customer_a < customer_b
    customer_b  text NOT NULL REFERENCES customers (customer_id),
    decided_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_a, customer_b),
    CHECK (customer_a < customer_b)
);

-- Resumable bulk imports: the rows of a file already loaded (server/cli/imports.py).
CREATE TABLE import_runs (
    run_id        text PRIMARY KEY,            -- hash of source system + file content
    source_system text NOT NULL,
    kind          text NOT NULL,               -- customers, accounts, cards
    rows_done     bigint NOT NULL DEFAULT 0,   -- rows committed so far (a resume skips them)
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
