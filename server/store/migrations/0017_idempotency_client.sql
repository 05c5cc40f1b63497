-- 0017: a request_id belongs to the client that sent it. Keyed by request_id alone, another client
-- with admin:write that knew (or guessed) it got the first client's stored answer replayed (after a
-- fingerprint key's retirement even for other arguments: an UpdateCustomerIdentity answer holds a
-- customer's golden record), or a refusal for its own new write. Rows from before name no client ('')
-- and replay for whoever retries them, as before.
ALTER TABLE idempotency ADD COLUMN client_id text NOT NULL DEFAULT '';
ALTER TABLE idempotency DROP CONSTRAINT idempotency_pkey;
ALTER TABLE idempotency ADD PRIMARY KEY (client_id, request_id);
