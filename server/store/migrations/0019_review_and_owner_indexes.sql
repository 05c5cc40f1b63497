-- crs: concurrent
-- 0019: what a merge and an unmerge look up by customer, and a card answer by account, indexed
-- (eighteenth and nineteenth audits, docs/audit-2026-12-04.md). A merge takes the open review tasks
-- that name the merged customer on either side, and an unmerge checks the survivor's; neither column
-- was indexed, so each merge read every open task while it held its customers' locks (50,000 open:
-- 44 ms and 15 ms; 0.09 and 0.18 ms with these). Listing accepted or rejected tasks sorted the whole
-- table a page (open ones have identity_reviews_open); an unmerge joined the survivor's active merges
-- unindexed. Built concurrently: these tables keep being written meanwhile (server/store/migrate.py).
CREATE INDEX CONCURRENTLY IF NOT EXISTS identity_reviews_open_by_customer
    ON identity_reviews (customer_id) WHERE status = 1;
CREATE INDEX CONCURRENTLY IF NOT EXISTS identity_reviews_open_by_candidate
    ON identity_reviews (candidate_id) WHERE status = 1;
CREATE INDEX CONCURRENTLY IF NOT EXISTS identity_reviews_decided
    ON identity_reviews (status, created_at, review_id) WHERE status <> 1;   -- open ones: identity_reviews_open
CREATE INDEX CONCURRENTLY IF NOT EXISTS customer_merges_by_survivor
    ON customer_merges (survivor_id) WHERE unmerged_at IS NULL;
-- A card answer carries its account's first owner alone: read in this order, one row (an account with
-- 5,000 related customers: 15 ms a card miss sorting them all, 28 ms before it stopped aggregating
-- them; server/store/reads.py _PRIMARY_SQL). The account answers' full list is read in it too.
CREATE INDEX CONCURRENTLY IF NOT EXISTS account_customers_in_order
    ON account_customers (account_id, role, created_at, customer_id);
