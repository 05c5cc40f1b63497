-- 0018: idempotency rows are kept CRS_IDEMPOTENCY_RETENTION (7 days), then pruned in batches, oldest
-- first (server/store/envelope.py prune_idempotency). Before, nothing removed them: one row per admin
-- write for ever. The index makes each batch a range scan instead of a sequential one.
CREATE INDEX idempotency_created_at ON idempotency (created_at);
