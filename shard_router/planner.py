"""How much a ring change moves: exactly over the hash space, and in real keys and bytes from a sample.

Pure: the caller (``crs shards plan``) SCANs the shards and measures MEMORY USAGE; this module only
counts. ``flows`` is exact (it merges the two rings' arcs); ``plan_moves`` extrapolates each shard's
sample to its key count (exact when the sample is the whole shard).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from shard_router.ketama import HASH_SPACE
from shard_router.ring import Ring

__all__ = ["MovePlan", "ShardMoves", "ShardSample", "flows", "moved_fraction", "plan_moves"]


def flows(source: Ring, target: Ring) -> dict[tuple[str, str], float]:
    """(owner under source, owner under target) -> fraction of the 32-bit hash space; sums to 1."""
    a, b = source.arcs(), target.arcs()
    counts: dict[tuple[str, str], int] = defaultdict(int)
    i = j = 0
    start = 0
    while start < HASH_SPACE:
        end = min(a[i][0], b[j][0])
        counts[(a[i][1], b[j][1])] += end - start + 1
        start = end + 1
        if a[i][0] == end:
            i += 1
        if b[j][0] == end:
            j += 1
    return {pair: n / HASH_SPACE for pair, n in counts.items()}


def moved_fraction(source: Ring, target: Ring) -> float:
    """Fraction of the hash space (so of uniformly hashed keys) whose owner changes."""
    return sum(f for (old, new), f in flows(source, target).items() if old != new)


@dataclass(frozen=True)
class ShardSample:
    """What a shard holds: ``total_keys`` (DBSIZE) and a sample of (key, bytes) from SCAN + MEMORY USAGE."""

    name: str
    total_keys: int
    keys: Sequence[tuple[str | bytes, int]] = ()


@dataclass
class ShardMoves:
    """One shard's side of a move. ``*_out``: leaves this shard; ``*_in``: arrives from others."""

    name: str
    keys_before: float = 0.0
    bytes_before: float = 0.0
    keys_out: float = 0.0
    bytes_out: float = 0.0
    keys_in: float = 0.0
    bytes_in: float = 0.0
    share_before: float = 0.0
    share_after: float = 0.0

    @property
    def keys_after(self) -> float:
        return self.keys_before - self.keys_out + self.keys_in

    @property
    def bytes_after(self) -> float:
        return self.bytes_before - self.bytes_out + self.bytes_in


@dataclass
class MovePlan:
    shards: dict[str, ShardMoves]
    hash_fraction: float                 # exact: part of the hash space changing owner
    exact: bool                          # every key was examined (no extrapolation)
    pairs: dict[tuple[str, str], float] = field(default_factory=dict)   # (from, to) -> keys moving

    @property
    def keys_total(self) -> float:
        return sum(s.keys_before for s in self.shards.values())

    @property
    def bytes_total(self) -> float:
        return sum(s.bytes_before for s in self.shards.values())

    @property
    def keys_moving(self) -> float:
        return sum(s.keys_out for s in self.shards.values())

    @property
    def bytes_moving(self) -> float:
        return sum(s.bytes_out for s in self.shards.values())

    @property
    def key_fraction(self) -> float:
        """Fraction of the cached keys that move (the hash fraction when the cache is empty)."""
        total = self.keys_total
        return self.keys_moving / total if total else self.hash_fraction


def plan_moves(source: Ring, target: Ring, samples: Sequence[ShardSample]) -> MovePlan:
    """Per shard: keys and bytes before, leaving, arriving, after; extrapolated from each sample.

    A key moves when its owner under `target` is not the shard it sits on (which also catches a key
    left on a shard that does not own it). A shard with keys but an empty sample is estimated from the
    hash space: it loses the part of its arc that changes owner, at its mean key size (0 when unknown).
    """
    share_before, share_after = source.share(), target.share()
    hash_flows = flows(source, target)
    names = [s.name for s in source.shards] + [s.name for s in target.shards if s.name not in share_before]
    moves = {name: ShardMoves(name, share_before=share_before.get(name, 0.0), share_after=share_after.get(name, 0.0))
             for name in names}
    pairs: dict[tuple[str, str], float] = defaultdict(float)
    exact = True
    for sample in samples:
        here = moves.setdefault(sample.name, ShardMoves(sample.name))
        here.keys_before = float(sample.total_keys)
        if not sample.total_keys:
            continue
        if not sample.keys:
            exact = False
            owned = share_before.get(sample.name, 0.0)
            for (old, new), f in hash_flows.items():
                if old == sample.name and new != old and owned:
                    n = sample.total_keys * f / owned
                    pairs[(old, new)] += n
                    here.keys_out += n
                    moves.setdefault(new, ShardMoves(new)).keys_in += n
            continue
        scale = sample.total_keys / len(sample.keys)
        if len(sample.keys) < sample.total_keys:
            exact = False
        for key, size in sample.keys:
            here.bytes_before += size * scale
            new = target.node_for(key)
            if new != sample.name:
                pairs[(sample.name, new)] += scale
                here.keys_out += scale
                here.bytes_out += size * scale
                dest = moves.setdefault(new, ShardMoves(new))
                dest.keys_in += scale
                dest.bytes_in += size * scale
    return MovePlan(shards=moves, hash_fraction=moved_fraction(source, target), exact=exact, pairs=dict(pairs))
