"""The change feed: every committed write, in commit order, for the systems that consume the repository.

    events    pure: what a write's Change becomes in the feed (type, operation, id, version, state)
    epochs    pure: whether a checkpoint (epoch, sequence) is part of the database's current history
    tailer    one PostgreSQL reader per node process (LISTEN/NOTIFY, polling fallback) fanned out to watchers
    service   ChangeFeedService: Watch (resume from a sequence, progress marks) and Snapshot

The sequence is drawn at commit time under one lock (server/store/envelope.py), so sequence order is
commit order and `seq > last` never skips a row that commits later. docs/feed.md is the manual.
"""
