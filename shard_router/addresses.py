"""Shard addresses as messages and comparisons need them, pure: a URL with its password masked
(`redact_url`), the server an address names whatever its spelling (`address_key`), and a shard
list's servers in one canonical line (`seed_text`: what a node reports in its heartbeat).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable


def redact_url(address: str) -> str:
    """`address` with its password (if any) replaced by ***, for logs and messages: a shard URL may
    carry one (redis://user:password@host), and it is decoded and sent only to Redis."""
    scheme, sep, rest = address.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return address
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"


LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


def address_key(address: str) -> str:
    """The Redis server and database an address names, so that two spellings of one server are seen
    as one (a joining copy's flush would otherwise empty a live shard): host in lower case, every
    loopback name alike, port 6379 and database 0 when left out; user, password and scheme aside
    (one port speaks TLS or not). `unix://` addresses: the socket path and database."""
    parts = urllib.parse.urlsplit(address)
    query = urllib.parse.parse_qs(parts.query)
    db = parts.path.strip("/") if parts.scheme != "unix" and parts.path.strip("/") else query.get("db", ["0"])[0]
    if parts.scheme == "unix":
        return f"unix:{parts.path}/{db}"
    host = (parts.hostname or "").lower()
    try:
        port: object = parts.port or 6379
    except ValueError:   # not a number: compared as written
        port = parts.netloc.rpartition(":")[2]
    return f"{'127.0.0.1' if host in LOOPBACK else host}:{port}/{db}"


def seed_text(shards: Iterable[tuple[str, int, Iterable[str]]]) -> str:
    """A canonical one-line form of a shard list with its servers, from (name, weight, copies) items:
    what a node started with (CRS_REDIS_SHARDS), compared with the list a first published version
    seeds. Servers as `address_key` writes them: never a password."""
    return ",".join(f"{name}={'|'.join(address_key(u) for u in copies)};{weight}"
                    for name, weight, copies in sorted(shards, key=lambda item: item[0]))
