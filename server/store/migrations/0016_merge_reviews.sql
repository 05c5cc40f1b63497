-- 0016: a merge remembers the open review tasks it re-pointed from the merged customer to the survivor,
-- so an unmerge points them back (docs/audit-2026-12-04.md, identity 6): after an unmerge they stayed on
-- the survivor, asking about a pair nobody proposed.
ALTER TABLE customer_merges ADD COLUMN reviews text[] NOT NULL DEFAULT '{}';
