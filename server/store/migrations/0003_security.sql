-- 0003: the service role, the append-only audit trail, key check values, fingerprint rotation columns.

-- The role node processes log in through (docs/security.md): data access, no DDL, and on the audit
-- trail only INSERT and SELECT. Migrations run as the schema owner, not as this role.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'crs_app') THEN
        CREATE ROLE crs_app NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA public TO crs_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO crs_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO crs_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO crs_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO crs_app;
REVOKE INSERT, UPDATE, DELETE ON schema_versions FROM crs_app;

-- Who did what, when, with what result: one row per admin write, successful or not.
CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    client_id    text NOT NULL,
    via          text NOT NULL,              -- mtls, jwt, anonymous
    rpc          text NOT NULL,
    request_id   text,
    entity_type  text,
    entity_ids   text[] NOT NULL DEFAULT '{}',
    result       text NOT NULL,              -- OK or the gRPC status name
    outbox_id    bigint
);
CREATE INDEX audit_log_by_time ON audit_log (at);
CREATE INDEX audit_log_by_client ON audit_log (client_id, at);
REVOKE ALL ON audit_log FROM crs_app;
GRANT SELECT, INSERT ON audit_log TO crs_app;

-- Append-only even for the owner: changing history needs a superuser to drop this trigger first.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- A check value per key (HMAC of a fixed label), so a wrong key is refused at start-up instead of
-- silently fingerprinting every card to a value that matches nothing.
CREATE TABLE key_checks (
    kind         text NOT NULL,              -- 'fingerprint'
    version      integer NOT NULL,
    check_value  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    retired_at   timestamptz,
    PRIMARY KEY (kind, version)
);

-- Fingerprint rotation (crs keys rotate-fingerprint): the new version's fingerprint is written next
-- to the current one, so lookups by either version find the row until the old one is retired.
ALTER TABLE cards ADD COLUMN next_fingerprint_version integer, ADD COLUMN next_pan_fingerprint bytea;
CREATE UNIQUE INDEX cards_next_fingerprint ON cards (next_fingerprint_version, next_pan_fingerprint)
    WHERE next_pan_fingerprint IS NOT NULL;
ALTER TABLE accounts ADD COLUMN next_fingerprint_version integer, ADD COLUMN next_account_fingerprint bytea;
CREATE UNIQUE INDEX accounts_next_fingerprint ON accounts (next_fingerprint_version, next_account_fingerprint)
    WHERE next_account_fingerprint IS NOT NULL;
