"""The shard topology: which Redis shards exist, where, with what weight and state, at which version.

Pure data: the topology, its checks, what a node routes by, and the diff of two shard lists. The
state machine that moves keys between rings is shard_router/moves.py; the I/O (PostgreSQL/file
storage, the warmer) lives in ``server/topology/``. See docs/runbooks/resharding.md for the
operator's view.

A topology is *stable* (one ring) or part of a move from a *source* ring to a *target* ring. A move
goes through three published versions, each of which every live node must run before the next is
published, so that two nodes one version apart never disagree in a way that can leave a stale value
in Redis:

============  ==================  ======================  ==========================
phase         reads               fills (SET after a      invalidations (DEL)
                                  PostgreSQL load)
============  ==================  ======================  ==========================
stable        owner               owner                   owner
preparing     source owner        source owner            source and target owners
migrating     target owner, then  target owner            source and target owners
              source owner (the
              value is copied to
              the target owner)
finishing     target owner        target owner            source and target owners
============  ==================  ======================  ==========================

``preparing`` makes every node delete on both owners before anyone puts a key on its new owner;
``migrating`` is when the warmer copies the moved keys; ``finishing`` stops all reads of the old
owners before their moved keys are deleted. Aborting a migrating or finishing move is a finishing
move in the opposite direction.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from shard_router.addresses import address_key, address_problem, redact_url
from shard_router.ring import Ring, ShardSpec

__all__ = [
    "Change",
    "Phase",
    "Routing",
    "ShardState",
    "Topology",
    "TopologyError",
    "TopologyShard",
    "diff",
    "ring_text",
    "routing_for",
]


class TopologyError(ValueError):
    """A topology, document or change that is not valid; the message says which value and why."""


class ShardState(enum.StrEnum):
    ACTIVE = "active"        # in the ring, serving
    WARMING = "warming"      # joining: in the target ring only, receiving the keys it will own
    DRAINING = "draining"    # leaving: in the source ring only, its keys moving to their new owners
    DOWN = "down"            # in the ring but taken out by an operator: its keys are served from
                             # PostgreSQL, never remapped; flushed before it serves again


class Phase(enum.StrEnum):
    STABLE = "stable"
    PREPARING = "preparing"
    MIGRATING = "migrating"
    FINISHING = "finishing"


MAX_ADDRESS_LENGTH = 512


@dataclass(frozen=True, slots=True)
class TopologyShard:
    """One shard as the topology records it. ``name`` and ``weight`` place keys (see ``ShardSpec``);
    ``address`` (a redis:// URL) only says where to reach it, so changing it moves no key.
    ``replicas``: more copies of the same shard (reads go to one copy, writes to all); like the
    address they never take part in placement. ``write_only``: replicas that get every write (fills,
    copies, deletes) but no read yet: one being added (nodes that still run the previous version do not
    delete on it, so it may serve only once every node writes it, and after a flush) or removed (nodes
    that still read it must get every delete until none does). shard_router/moves.py, add_replica."""

    name: str
    address: str
    weight: int = 1
    state: ShardState = ShardState.ACTIVE
    replicas: tuple[str, ...] = ()
    write_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            ShardSpec(self.name, self.weight)   # validates both, naming the bad value
        except (TypeError, ValueError) as exc:
            raise TopologyError(str(exc)) from None
        if not isinstance(self.replicas, tuple):
            raise TopologyError(f"shard {self.name!r}: replicas must be a tuple of URLs (got {self.replicas!r})")
        for address in (self.address, *self.replicas):
            check_address(self.name, address)
        if len({address_key(u) for u in self.copies}) != len(self.copies):
            raise TopologyError(f"shard {self.name!r}: a copy is listed twice")
        if not isinstance(self.write_only, tuple) or len(set(self.write_only)) != len(self.write_only) \
                or not set(self.write_only) <= set(self.replicas):
            raise TopologyError(f"shard {self.name!r}: write_only must list some of its replicas, each once"
                                f" (got {_copies_text(tuple(map(str, self.write_only)))})")
        if not isinstance(self.state, ShardState):
            raise TopologyError(f"shard {self.name!r}: state must be a ShardState (got {self.state!r})")

    @property
    def spec(self) -> ShardSpec:
        return ShardSpec(self.name, self.weight)

    @property
    def copies(self) -> tuple[str, ...]:
        """Every copy's URL, the primary (``address``) first."""
        return (self.address, *self.replicas)

    @property
    def readable(self) -> tuple[str, ...]:
        """The copies reads may go to: every copy but the write-only ones."""
        return tuple(u for u in self.copies if u not in self.write_only)


def check_address(name: str, address: object) -> None:
    if not isinstance(address, str) or not address or len(address) > MAX_ADDRESS_LENGTH \
            or any(ch.isspace() for ch in address):
        raise TopologyError(f"shard {name!r}: address must be a non-empty URL without spaces,"
                            f" at most {MAX_ADDRESS_LENGTH} characters (got {redact_url(str(address))!r})")
    if not address.startswith(("redis://", "rediss://", "unix://")):
        raise TopologyError(f"shard {name!r}: address must start with redis://, rediss:// or unix://"
                            f" (got {redact_url(address)!r})")
    if (problem := address_problem(address)) is not None:
        raise TopologyError(f"shard {name!r}: {problem} (got {redact_url(address)!r})")


@dataclass(frozen=True)
class Topology:
    """One version of the topology. ``shards`` lists every shard a node must talk to: the target ring
    is every shard that is not draining; ``source`` is the ring being left (empty when stable)."""

    version: int
    shards: tuple[TopologyShard, ...]
    phase: Phase = Phase.STABLE
    source: tuple[ShardSpec, ...] = ()
    aborting: bool = False     # this move returns to the ring an aborted move started from
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise TopologyError("invalid topology: " + "; ".join(problems))

    # -- views -------------------------------------------------------------------------------------
    @property
    def is_stable(self) -> bool:
        return self.phase is Phase.STABLE

    @property
    def target_specs(self) -> tuple[ShardSpec, ...]:
        return tuple(s.spec for s in self.shards if s.state is not ShardState.DRAINING)

    @property
    def source_specs(self) -> tuple[ShardSpec, ...]:
        """The ring keys are moving away from; the target ring itself when stable."""
        return self.source or self.target_specs

    @cached_property
    def target_ring(self) -> Ring:
        return Ring(self.target_specs)

    @cached_property
    def source_ring(self) -> Ring:
        return Ring(self.source) if self.source else self.target_ring

    def shard(self, name: str) -> TopologyShard:
        for s in self.shards:
            if s.name == name:
                return s
        raise TopologyError(f"no shard named {name!r} in topology version {self.version}")

    def names(self) -> list[str]:
        return [s.name for s in self.shards]

    # -- the stored form ---------------------------------------------------------------------------
    def to_document(self) -> dict[str, Any]:
        """A JSON-able dict; ``from_document`` reads it back. The PostgreSQL row and the file hold this."""
        doc: dict[str, Any] = {
            "version": self.version,
            "phase": self.phase.value,
            "shards": [{"name": s.name, "address": s.address, "weight": s.weight, "state": s.state.value}
                       | ({"replicas": list(s.replicas)} if s.replicas else {})
                       | ({"write_only": list(s.write_only)} if s.write_only else {})
                       for s in self.shards],
        }
        if self.source:
            doc["source"] = [{"name": s.name, "weight": s.weight} for s in self.source]
        if self.aborting:
            doc["aborting"] = True
        if self.note:
            doc["note"] = self.note
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Topology:
        if not isinstance(doc, Mapping):
            raise TopologyError(f"a topology document is a JSON object, not {type(doc).__name__}")
        unknown = set(doc) - {"version", "phase", "shards", "source", "aborting", "note"}
        if unknown:
            raise TopologyError(f"unknown topology field(s): {', '.join(sorted(unknown))}")
        try:
            version = doc["version"]
            raw_shards = doc["shards"]
        except KeyError as exc:
            raise TopologyError(f"topology document lacks {exc.args[0]!r}") from None
        if isinstance(version, bool) or not isinstance(version, int):
            raise TopologyError(f"version must be an integer (got {version!r})")
        try:
            phase = Phase(doc.get("phase", "stable"))
        except ValueError:
            raise TopologyError(f"phase must be one of {', '.join(p.value for p in Phase)}"
                                f" (got {doc.get('phase')!r})") from None
        shards = tuple(_shard_from(item) for item in _list_of_objects(raw_shards, "shards"))
        source = tuple(_spec_from(item) for item in _list_of_objects(doc.get("source", []), "source"))
        aborting = doc.get("aborting", False)
        note = doc.get("note", "")
        if not isinstance(aborting, bool) or not isinstance(note, str):
            raise TopologyError("aborting must be a boolean and note a string")
        return cls(version=version, shards=shards, phase=phase, source=source, aborting=aborting, note=note)

    @classmethod
    def bootstrap(cls, shards: Iterable[tuple[str, str, int] | tuple[str, str, int, tuple[str, ...]]]) -> Topology:
        """Version 0: the stable topology a node builds from CRS_REDIS_SHARDS while none is stored.
        Each item: (name, address, weight) or (name, address, weight, replicas)."""
        built = []
        for name, address, weight, *rest in shards:
            replicas: tuple[str, ...] = tuple(rest[0]) if rest else ()
            built.append(TopologyShard(name, address, weight, replicas=replicas))
        return cls(version=0, shards=tuple(built))


def _list_of_objects(value: Any, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        raise TopologyError(f"{what} must be a list of objects")
    return value


def _shard_from(item: Mapping[str, Any]) -> TopologyShard:
    unknown = set(item) - {"name", "address", "weight", "state", "replicas", "write_only"}
    if unknown:
        raise TopologyError(f"unknown shard field(s): {', '.join(sorted(unknown))}")
    try:
        state = ShardState(item.get("state", "active"))
    except ValueError:
        raise TopologyError(f"shard {item.get('name')!r}: state must be one of"
                            f" {', '.join(s.value for s in ShardState)} (got {item.get('state')!r})") from None
    try:
        replicas = item.get("replicas", [])
        write_only = item.get("write_only", [])
        if not isinstance(replicas, list) or not isinstance(write_only, list):
            raise TopologyError(f"shard {item.get('name')!r}: replicas and write_only must be lists of URLs")
        return TopologyShard(name=item["name"], address=item["address"], weight=item.get("weight", 1), state=state,
                             replicas=tuple(replicas), write_only=tuple(write_only))
    except KeyError as exc:
        raise TopologyError(f"a shard lacks {exc.args[0]!r}") from None
    except TypeError as exc:
        raise TopologyError(str(exc)) from None


def _spec_from(item: Mapping[str, Any]) -> ShardSpec:
    try:
        return ShardSpec(item["name"], item.get("weight", 1))
    except KeyError as exc:
        raise TopologyError(f"a source shard lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise TopologyError(str(exc)) from None


def _problems(t: Topology) -> list[str]:
    problems: list[str] = []
    if isinstance(t.version, bool) or not isinstance(t.version, int) or t.version < 0:
        problems.append(f"version must be an integer >= 0 (got {t.version!r})")
    if not isinstance(t.phase, Phase):
        problems.append(f"phase must be a Phase (got {t.phase!r})")
        return problems
    if not t.shards:
        problems.append("it needs at least one shard")
        return problems
    names = [s.name for s in t.shards]
    if len(set(names)) != len(names):
        problems.append(f"shard names must be unique (got {names})")
    addresses = [address_key(a) for s in t.shards for a in s.copies]
    if len(set(addresses)) != len(addresses):
        dup = sorted({a for a in addresses if addresses.count(a) > 1})
        problems.append(f"two shards cannot share an address ({', '.join(dup)})")
    by_state = {state: {s.name for s in t.shards if s.state is state} for state in ShardState}
    source_names = [s.name for s in t.source]
    if len(set(source_names)) != len(source_names):
        problems.append(f"source shard names must be unique (got {source_names})")
    if t.phase is Phase.STABLE:
        if t.source:
            problems.append("a stable topology has no source ring")
        if by_state[ShardState.WARMING] or by_state[ShardState.DRAINING]:
            problems.append("a stable topology has no warming or draining shard")
        if t.aborting:
            problems.append("a stable topology is not aborting")
        if not any(s.state is ShardState.ACTIVE for s in t.shards):
            problems.append("at least one shard must be active")
        return problems
    if not t.source:
        problems.append(f"a {t.phase.value} topology needs its source ring")
    if any(s.write_only for s in t.shards):
        problems.append("no replica can be write-only during a move (finish adding or removing it first)")
    if by_state[ShardState.DOWN]:
        problems.append(f"no shard can be down during a move (down: {', '.join(sorted(by_state[ShardState.DOWN]))})")
    unknown = set(source_names) - set(names)
    if unknown:
        problems.append(f"source shard(s) {', '.join(sorted(unknown))} missing from shards (their address is needed)")
    for s in t.shards:
        in_source = s.name in source_names
        if s.state is ShardState.WARMING and in_source:
            problems.append(f"shard {s.name!r} is warming but in the source ring")
        elif s.state is ShardState.DRAINING and not in_source:
            problems.append(f"shard {s.name!r} is draining but not in the source ring")
        elif s.state is ShardState.ACTIVE and not in_source:
            problems.append(f"shard {s.name!r} is new to the ring: its state must be warming")
    if not any(s.state is not ShardState.DRAINING for s in t.shards):
        problems.append("the target ring needs at least one shard")
    return problems


def ring_text(specs: Iterable[ShardSpec]) -> str:
    """A canonical one-line form of a ring ('shard-0:1,shard-1:2'): what nodes report, for comparing."""
    return ",".join(f"{s.name}:{s.weight}" for s in sorted(specs, key=lambda s: s.name))


# --------------------------------------------------------------------------------------------------
# What a node does with a topology
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Where a node sends each operation under one topology (the table in the module docstring).

    ``read``: the first shard asked, and where fills go. ``fallback``: asked on a miss (migrating
    only); a value found there is copied to the ``read`` owner. ``also_invalidate``: the other ring,
    whose owner also gets every DEL while a move is under way."""

    read: Ring
    fallback: Ring | None = None
    also_invalidate: Ring | None = None


def routing_for(t: Topology) -> Routing:
    if t.phase is Phase.STABLE:
        return Routing(read=t.target_ring)
    if t.phase is Phase.PREPARING:
        return Routing(read=t.source_ring, also_invalidate=t.target_ring)
    if t.phase is Phase.MIGRATING:
        return Routing(read=t.target_ring, fallback=t.source_ring, also_invalidate=t.source_ring)
    return Routing(read=t.target_ring, also_invalidate=t.source_ring)


# --------------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between two shard lists. ``kind``: add, remove, reweight, address, replicas or state."""

    kind: str
    name: str
    before: str = ""
    after: str = ""

    def __str__(self) -> str:
        if self.kind == "add":
            return f"+ {self.name} ({self.after})"
        if self.kind == "remove":
            return f"- {self.name} ({self.before})"
        return f"~ {self.name} {self.kind} {self.before} -> {self.after}"


def _copies_text(urls: tuple[str, ...]) -> str:
    return "|".join(redact_url(u) for u in urls) or "none"


def _replicas_text(s: TopologyShard) -> str:
    return "|".join(redact_url(u) + (" (write-only)" if u in s.write_only else "") for u in s.replicas) or "none"


def diff(before: Iterable[TopologyShard], after: Iterable[TopologyShard]) -> list[Change]:
    """What changes from `before` to `after`, in the order of `before` then the added shards.
    Addresses appear without their passwords (redact_url): these lines are logged and printed."""
    old = {s.name: s for s in before}
    new = {s.name: s for s in after}
    changes: list[Change] = []
    for name, s in old.items():
        n = new.get(name)
        if n is None:
            changes.append(Change("remove", name, before=f"{redact_url(s.address)} weight {s.weight}"))
            continue
        if n.weight != s.weight:
            changes.append(Change("reweight", name, str(s.weight), str(n.weight)))
        if n.address != s.address:
            changes.append(Change("address", name, redact_url(s.address), redact_url(n.address)))
        if n.replicas != s.replicas or n.write_only != s.write_only:
            changes.append(Change("replicas", name, _replicas_text(s), _replicas_text(n)))
        if n.state is not s.state:
            changes.append(Change("state", name, s.state.value, n.state.value))
    for name, n in new.items():
        if name not in old:
            changes.append(Change("add", name, after=f"{redact_url(n.address)} weight {n.weight}"))
    return changes
