"""Resharding as pure transitions: staging a draft shard list, then begin -> advance -> stable, or
abort, and an operator's shard state changes. Each returns a new Topology (the phases are described
in shard_router/topology.py); server/topology/ publishes them and waits for the nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from shard_router.addresses import address_key, redact_url
from shard_router.topology import Phase, ShardState, Topology, TopologyError, TopologyShard, ring_text

# --------------------------------------------------------------------------------------------------
# Staging a change (the draft: the target shard list, all active)
# --------------------------------------------------------------------------------------------------


def _check_draftable(draft: Sequence[TopologyShard]) -> tuple[TopologyShard, ...]:
    shards = tuple(draft)
    # Reuse the topology checks: a draft is a valid stable shard list.
    Topology(version=0, shards=shards)
    return shards


def stage_add(draft: Sequence[TopologyShard], name: str, address: str, weight: int = 1) -> tuple[TopologyShard, ...]:
    if any(s.name == name for s in draft):
        raise TopologyError(f"shard {name!r} is already in the topology")
    return _check_draftable([*draft, TopologyShard(name, address, weight)])


def stage_remove(draft: Sequence[TopologyShard], name: str) -> tuple[TopologyShard, ...]:
    if not any(s.name == name for s in draft):
        raise TopologyError(f"no shard named {name!r} to remove")
    rest = [s for s in draft if s.name != name]
    if not rest:
        raise TopologyError(f"cannot remove {name!r}: it is the last shard")
    return _check_draftable(rest)


def stage_reweight(draft: Sequence[TopologyShard], name: str, weight: int) -> tuple[TopologyShard, ...]:
    if not any(s.name == name for s in draft):
        raise TopologyError(f"no shard named {name!r} to reweight")
    return _check_draftable([replace(s, weight=weight) if s.name == name else s for s in draft])

__all__ = ["abort", "add_replica", "advance", "begin", "retire_replica", "set_state", "settle_replica", "stage_add",
           "stage_remove", "stage_reweight"]


# --------------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------------


def _moving(version: int, target: Sequence[TopologyShard], source: Sequence[TopologyShard], *,
            phase: Phase, aborting: bool) -> Topology:
    """A non-stable topology moving keys from `source` to `target` (each a list of shards with addresses)."""
    target_names = {s.name for s in target}
    source_names = {s.name for s in source}
    shards = [replace(s, state=ShardState.ACTIVE if s.name in source_names else ShardState.WARMING) for s in target]
    shards += [replace(s, state=ShardState.DRAINING) for s in source if s.name not in target_names]
    return Topology(version=version, shards=tuple(shards), phase=phase,
                    source=tuple(s.spec for s in source), aborting=aborting)


def begin(current: Topology, draft: Sequence[TopologyShard]) -> Topology:
    """The first version of a move from the stable `current` to the shard list `draft`: preparing."""
    if not current.is_stable:
        raise TopologyError(f"topology version {current.version} is {current.phase.value}: finish it"
                            " (crs shards apply) or abort it (crs shards abort) first")
    halfway = [s.name for s in current.shards if s.write_only]
    if halfway:
        raise TopologyError(f"shard(s) {', '.join(halfway)} have a write-only replica: finish adding or removing it"
                            " (crs shards add-replica / remove-replica again) before moving keys")
    down = [s.name for s in current.shards if s.state is ShardState.DOWN]
    if down:
        raise TopologyError(f"shard(s) {', '.join(down)} marked down: mark them active before moving keys")
    target = _check_draftable([replace(s, state=ShardState.ACTIVE) for s in draft])
    by_name = {s.name: s for s in current.shards}
    for s in target:
        old = by_name.get(s.name)
        if old is not None and old.copies != s.copies:
            raise TopologyError(f"shard {s.name!r}: its address cannot change during a move (nor its replicas)")
    if ring_text(s.spec for s in target) == ring_text(current.target_specs):
        raise TopologyError("the draft has the same shards and weights as the current ring: nothing to apply")
    return _moving(current.version + 1, target, current.shards, phase=Phase.PREPARING, aborting=False)


def advance(t: Topology) -> Topology:
    """The next version: preparing -> migrating -> finishing -> stable."""
    if t.phase is Phase.STABLE:
        raise TopologyError(f"topology version {t.version} is stable: nothing to advance")
    if t.phase is Phase.PREPARING:
        return replace(t, version=t.version + 1, phase=Phase.MIGRATING, note="")
    if t.phase is Phase.MIGRATING:
        return replace(t, version=t.version + 1, phase=Phase.FINISHING, note="")
    shards = tuple(replace(s, state=ShardState.ACTIVE) for s in t.shards if s.state is not ShardState.DRAINING)
    return Topology(version=t.version + 1, shards=shards)


def abort(t: Topology) -> Topology:
    """The next version on the way back to the source ring.

    Preparing: nobody has put a key on a new owner yet, so the source ring is stable again at once.
    Migrating or finishing: new owners hold copies, so the way back is a finishing move towards the
    source ring (reads go to the source owners only, deletes to both), then the copies are deleted.
    """
    if t.phase is Phase.STABLE:
        raise TopologyError(f"topology version {t.version} is stable: nothing to abort")
    by_name = {s.name: s for s in t.shards}
    source = [replace(by_name[spec.name], weight=spec.weight) for spec in t.source]
    if t.phase is Phase.PREPARING:
        return Topology(version=t.version + 1, shards=tuple(replace(s, state=ShardState.ACTIVE) for s in source))
    target = [s for s in t.shards if s.state is not ShardState.DRAINING]
    return _moving(t.version + 1, source, target, phase=Phase.FINISHING, aborting=not t.aborting)


def set_state(current: Topology, name: str, state: ShardState) -> Topology:
    """Take a shard out (down) or put it back (active) without moving any key."""
    if not current.is_stable:
        raise TopologyError(f"topology version {current.version} is {current.phase.value}:"
                            " a shard's state can change only in a stable topology")
    if state not in (ShardState.ACTIVE, ShardState.DOWN):
        raise TopologyError(f"an operator can mark a shard active or down, not {state.value}")
    shard = current.shard(name)
    if shard.state is state:
        raise TopologyError(f"shard {name!r} is already {state.value}")
    shards = tuple(replace(s, state=state) if s.name == name else s for s in current.shards)
    return Topology(version=current.version + 1, shards=shards)


# --------------------------------------------------------------------------------------------------
# A shard's replicas: added or removed in two versions, never read by a node that another misses
# --------------------------------------------------------------------------------------------------
# A node still on the version before an added copy deletes only on the copies it knows, so a node on
# the new version must not read the new copy (it would keep a value a write changed) until every node
# writes it, and then only after a flush. Removing is the mirror: a copy stops being read on every node
# before anyone stops deleting on it. Both go through a write-only version (TopologyShard.write_only):
#
#     add:    +copy write-only  -> every live node runs it -> flush the copy -> copy readable
#     remove: copy write-only   -> every live node runs it ->                   copy gone
#
# A run interrupted between the two leaves the copy write-only; either command finishes it.


def _stable_for_replicas(current: Topology) -> None:
    if not current.is_stable:
        raise TopologyError(f"topology version {current.version} is {current.phase.value}:"
                            " a shard's replicas can change only in a stable topology")


def add_replica(current: Topology, name: str, url: str) -> Topology:
    """The first version of adding copy `url` to shard `name`: written, not read."""
    _stable_for_replicas(current)
    shard = current.shard(name)
    if address_key(url) in {address_key(u) for u in shard.copies}:
        raise TopologyError(f"shard {name!r} already has the copy {redact_url(url)}")
    new = replace(shard, replicas=(*shard.replicas, url), write_only=(*shard.write_only, url))
    return _with_shard(current, new)


def retire_replica(current: Topology, name: str, url: str) -> Topology:
    """The first version of removing replica `url` from shard `name`: still written, no longer read."""
    _stable_for_replicas(current)
    shard = current.shard(name)
    if url not in shard.replicas:
        raise TopologyError(f"{redact_url(url)} is not a replica of {name!r}")
    if url in shard.write_only:
        raise TopologyError(f"replica {redact_url(url)} of {name!r} is already write-only")
    return _with_shard(current, replace(shard, write_only=(*shard.write_only, url)))


def settle_replica(current: Topology, name: str, url: str, *, keep: bool) -> Topology:
    """The second version: write-only copy `url` of shard `name` readable (`keep`; flush it first) or gone."""
    _stable_for_replicas(current)
    shard = current.shard(name)
    if url not in shard.write_only:
        raise TopologyError(f"{redact_url(url)} is not a write-only replica of {name!r}")
    write_only = tuple(u for u in shard.write_only if u != url)
    replicas = shard.replicas if keep else tuple(u for u in shard.replicas if u != url)
    return _with_shard(current, replace(shard, replicas=replicas, write_only=write_only))


def _with_shard(current: Topology, new: TopologyShard) -> Topology:
    shards = tuple(new if s.name == new.name else s for s in current.shards)
    return Topology(version=current.version + 1, shards=shards)
