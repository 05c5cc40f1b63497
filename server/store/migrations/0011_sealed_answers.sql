-- 0011: an answer that holds personal data (UpdateCustomerIdentity's golden record: address, phone,
-- email) is kept for replays sealed under a data key, as source records are: `answer_dek_id` names
-- it. NULL: the answer is kept as it was sent (no personal data in it).
ALTER TABLE idempotency ADD COLUMN answer_dek_id integer;
