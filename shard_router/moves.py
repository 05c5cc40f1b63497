"""Resharding as pure transitions: staging a draft shard list, then begin -> advance -> stable, or
abort, and an operator's shard state changes. Each returns a new Topology (the phases are described
in shard_router/topology.py); server/topology/ publishes them and waits for the nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

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

__all__ = ["abort", "advance", "begin", "set_state", "stage_add", "stage_remove", "stage_reweight"]


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


def set_replicas(current: Topology, name: str, replicas: Sequence[str]) -> Topology:
    """Give shard `name` these replicas (its primary unchanged) without moving any key: placement is
    by shard name, so the ring is the same; nodes flush a new copy before it serves."""
    if not current.is_stable:
        raise TopologyError(f"topology version {current.version} is {current.phase.value}:"
                            " a shard's replicas can change only in a stable topology")
    shard = current.shard(name)
    if tuple(replicas) == shard.replicas:
        raise TopologyError(f"shard {name!r} already has exactly these replicas")
    shards = tuple(replace(s, replicas=tuple(replicas)) if s.name == name else s for s in current.shards)
    return Topology(version=current.version + 1, shards=shards)
