"""Shard addresses as messages and comparisons need them, pure: a URL with its password masked
(`redact_url`), the server an address names whatever its spelling (`address_key`), and a shard
list's servers in one canonical line (`seed_text`: what a node reports in its heartbeat), and the
shard list itself (`parse_shards`, `format_shards`: the syntax of CRS_REDIS_SHARDS).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass


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
    # The database as redis-py reads it (the node's clients all do: server/cache/resp.py): `?db=N` first,
    # then the path's digits, else 0.
    path_db = parts.path.replace("/", "") if parts.scheme != "unix" else ""
    db = query.get("db", [path_db if path_db.isdigit() else "0"])[0]
    if parts.scheme == "unix":
        return f"unix:{parts.path}/{db}"
    host = (parts.hostname or "").lower()
    try:
        port: object = parts.port or 6379
    except ValueError:   # not a number: compared as written
        port = parts.netloc.rpartition(":")[2]
    return f"{'127.0.0.1' if host in LOOPBACK else host}:{port}/{db}"


def address_problem(address: str) -> str | None:
    """What the node's Redis clients would refuse in `address`, or None: a port that is not a number
    from 1 to 65535, a `db` that is not a number. Refused when the address is read (a topology, the
    shard list), not when a node opens its clients: a version naming one stopped every node."""
    parts = urllib.parse.urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 and parts.scheme != "unix" and ":" in parts.netloc.rpartition("@")[2].rpartition("]")[2]:
        return "the port must be a number from 1 to 65535"
    if any(not db.isdigit() for db in urllib.parse.parse_qs(parts.query).get("db", [])):
        return "db must be a number"
    return None


def seed_text(shards: Iterable[tuple[str, int, Iterable[str]]]) -> str:
    """A canonical one-line form of a shard list with its servers, from (name, weight, copies) items:
    what a node started with (CRS_REDIS_SHARDS), compared with the list a first published version
    seeds. Servers as `address_key` writes them: never a password."""
    return ",".join(f"{name}={'|'.join(address_key(u) for u in copies)};{weight}"
                    for name, weight, copies in sorted(shards, key=lambda item: item[0]))


class ShardListError(ValueError):
    """A shard list (CRS_REDIS_SHARDS's syntax) is malformed; the message names the shard."""


@dataclass(frozen=True)
class ShardAddress:
    """One shard of CRS_REDIS_SHARDS: its name and weight place keys; `url` is its primary copy and
    `replicas` its other copies (docs/decisions.md "Replicated shards"), which never move a key."""

    name: str
    url: str
    weight: int = 1
    replicas: tuple[str, ...] = ()

    @property
    def copies(self) -> tuple[str, ...]:
        return (self.url, *self.replicas)


def parse_shards(text: str) -> tuple[ShardAddress, ...]:
    """'shard-0=redis://a:6379/0|redis://b:6379/0,shard-1=redis://...;weight=2' -> ShardAddress list.
    Copies of one shard are separated by '|': the first is the primary, the others its replicas."""
    shards: list[ShardAddress] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, rest = part.partition("=")
        name = name.strip()
        if not sep or not name or not rest:
            raise ShardListError(f"entry {part!r} is not NAME=redis://HOST:PORT/DB[|REPLICA_URL...][;weight=N]")
        urls, _, opts = rest.partition(";")
        weight = 1
        if opts:
            key, _, val = opts.partition("=")
            if key != "weight" or not val.isdigit() or int(val) <= 0:
                raise ShardListError(f"shard {name!r}: option {opts!r} is not weight=N (N > 0)")
            weight = int(val)
        copies = [u.strip() for u in urls.split("|")]
        for url in copies:
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ShardListError(f"shard {name!r}: every url (copies separated by '|')"
                                    " must start with redis://, rediss:// or unix://")
            if (problem := address_problem(url)) is not None:
                raise ShardListError(f"shard {name!r}: {problem} in {redact_url(url)!r}")
        if len({address_key(u) for u in copies}) != len(copies):
            raise ShardListError(f"shard {name!r}: a copy is listed twice")
        shards.append(ShardAddress(name=name, url=copies[0], weight=weight, replicas=tuple(copies[1:])))
    if len({s.name for s in shards}) != len(shards):
        raise ShardListError("shard names must be unique")
    every = [address_key(u) for s in shards for u in s.copies]
    if len(set(every)) != len(every):
        raise ShardListError("two shards (or copies) cannot share a url")
    return tuple(shards)


def format_shards(shards: tuple[ShardAddress, ...]) -> str:
    return ",".join(f"{s.name}={'|'.join(s.copies)}" + (f";weight={s.weight}" if s.weight != 1 else "")
                    for s in shards)
