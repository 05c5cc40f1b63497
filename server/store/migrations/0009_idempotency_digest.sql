-- 0009: a request_id remembers what it asked. A retry must ask the same; the same request_id with
-- other arguments is refused (ALREADY_EXISTS) instead of answered with the first request's answer.
-- The digest is an HMAC under the fingerprint key of `digest_version` (requests may carry a PAN or
-- a national id: no unkeyed hash of them is stored). Rows written before this migration have none
-- and are replayed as before.
ALTER TABLE idempotency ADD COLUMN request_digest bytea, ADD COLUMN digest_version integer;
