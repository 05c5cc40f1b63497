"""Migration files (server/store/migrate.py): which statements a concurrent migration may hold, and
this release's files as shipped."""

from __future__ import annotations

import pytest

from server.store.migrate import CONCURRENT_MARK, Migration, available_migrations


def _concurrent(body: str) -> Migration:
    return Migration(19, "an_index", f"{CONCURRENT_MARK}\n{body}")


def test_a_concurrent_migration_holds_index_statements_a_rerun_repeats() -> None:
    mig = _concurrent("-- why: the relay's scan\n"
                      "CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_by_attempt ON outbox (attempted_at)\n"
                      "  WHERE settled_at IS NULL;\n"
                      "create unique index concurrently if not exists cards_ref on cards (ref);\n"
                      "DROP INDEX CONCURRENTLY IF EXISTS an_old_one;   -- replaced by cards_ref\n")
    assert mig.concurrent
    assert [index for _, index in mig.statements()] == ["outbox_by_attempt", "cards_ref", None]
    assert mig.statements()[0][0].endswith("WHERE settled_at IS NULL")
    assert not Migration(18, "plain", "CREATE INDEX x ON t (a);").concurrent


@pytest.mark.parametrize("body", [
    "CREATE INDEX CONCURRENTLY cards_ref ON cards (ref);",                 # no IF NOT EXISTS: a rerun fails
    "CREATE INDEX IF NOT EXISTS cards_ref ON cards (ref);",                # not concurrent: blocks writes
    "DROP INDEX CONCURRENTLY an_old_one;",
    "CREATE TABLE t (a int);",                                             # not an index at all
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x); UPDATE t SET x = 1;",
    "-- nothing but a comment\n",
])
def test_anything_else_in_a_concurrent_migration_is_refused(body: str) -> None:
    with pytest.raises(ValueError, match="0019_an_index"):
        _concurrent(body).statements()


def test_this_release_s_migrations_load() -> None:
    """Numbers unique, every concurrent one well formed (available_migrations refuses otherwise)."""
    migrations = available_migrations()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    assert all(m.statements() for m in migrations if m.concurrent)
