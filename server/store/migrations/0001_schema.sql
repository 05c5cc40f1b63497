-- 0001: customers, accounts, relationships, cards, data keys, outbox, idempotency.
-- No column ever holds a clear PAN or account number: fingerprints (HMAC-SHA256, versioned key),
-- BIN/last four for display, and AES-256-GCM ciphertext under a wrapped data key.
-- Status and type columns hold the crs.v1 enum numbers.

CREATE TABLE customers (
    customer_id   text PRIMARY KEY,
    display_name  text NOT NULL,
    segment       text NOT NULL,
    status        smallint NOT NULL,
    kyc_status    smallint NOT NULL,
    version       bigint NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE data_keys (
    dek_id        integer PRIMARY KEY,
    kek_version   integer NOT NULL,
    wrapped_key   bytea NOT NULL,
    active        boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    account_id            text PRIMARY KEY,
    routing_number        char(9) NOT NULL,
    fingerprint_version   integer NOT NULL,
    account_fingerprint   bytea NOT NULL,
    account_last4         char(4) NOT NULL,
    account_length        smallint NOT NULL,
    account_ciphertext    bytea NOT NULL,
    dek_id                integer NOT NULL REFERENCES data_keys (dek_id),
    account_type          smallint NOT NULL,
    currency              char(3) NOT NULL,
    status                smallint NOT NULL,
    version               bigint NOT NULL DEFAULT 1,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (fingerprint_version, account_fingerprint)
);

CREATE TABLE account_customers (
    account_id    text NOT NULL REFERENCES accounts (account_id),
    customer_id   text NOT NULL REFERENCES customers (customer_id),
    role          smallint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, customer_id)
);
CREATE INDEX account_customers_by_customer ON account_customers (customer_id);

CREATE TABLE cards (
    token                 text PRIMARY KEY,
    fingerprint_version   integer NOT NULL,
    pan_fingerprint       bytea NOT NULL,
    bin                   char(6) NOT NULL,
    last4                 char(4) NOT NULL,
    pan_length            smallint NOT NULL,
    pan_ciphertext        bytea NOT NULL,
    dek_id                integer NOT NULL REFERENCES data_keys (dek_id),
    expiry                char(7) NOT NULL,
    account_id            text REFERENCES accounts (account_id),
    status                smallint NOT NULL,
    version               bigint NOT NULL DEFAULT 1,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (fingerprint_version, pan_fingerprint)
);
CREATE INDEX cards_by_account ON cards (account_id);

-- Every change, written in the same transaction as the change itself (DESIGN.md §3).
-- invalidated_at: the writing node deleted the cache keys after commit.
-- settled_at: the relay deleted them again after reinvalidate_delay (closes the read/write race)
-- and published the event; rows stay for the change feed.
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    event_type      text NOT NULL,
    entity_type     text NOT NULL,
    entity_id       text NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}'::jsonb,
    cache_keys      text[] NOT NULL DEFAULT '{}',
    invalidated_at  timestamptz,
    settled_at      timestamptz
);
CREATE INDEX outbox_unsettled ON outbox (created_at) WHERE settled_at IS NULL;

-- Client-supplied request ids of admin writes: a retry returns the first answer.
CREATE TABLE idempotency (
    request_id    text PRIMARY KEY,
    rpc           text NOT NULL,
    response      bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
