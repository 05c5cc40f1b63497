-- 0008: identity_blocks loses its foreign key to source_records (docs/decisions.md "Blocking keys
-- without a foreign key"). A bulk import writes ~7 blocking keys per record; the key's referential
-- check ran once per row and was a fifth of PostgreSQL's work in an import (measured: 3.3 s -> 1.8 s
-- of COPY time for 50,000 rows). Blocks are derived data written only with their record, in the same
-- transaction (server/store/identity.py, server/store/bulk.py), and source records are never deleted,
-- so the cascade never ran. identity_blocks_by_record stays: replacing a record's blocks uses it.
ALTER TABLE identity_blocks DROP CONSTRAINT identity_blocks_record_id_fkey;
