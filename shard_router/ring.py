"""Consistent-hash ring that routes keys exactly like twemproxy ``distribution: ketama``, ``hash: md5``.

The server calls only ``Ring(shards)``, ``Ring.shards``, ``Ring.node_for``, ``Ring.group_by_node`` and
``Ring.share``; the resharding planner also reads ``Ring.arcs``. See docs/ring.md for the algorithm and
the compatibility evidence.
"""

from __future__ import annotations

import re
import struct
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import md5

from shard_router.ketama import HASH_SPACE, continuum

__all__ = ["MAX_NAME_LENGTH", "MAX_TOTAL_WEIGHT", "MAX_WEIGHT", "Ring", "ShardSpec"]

#: twemproxy formats "<name>-<i>" into an 86-byte buffer and then hashes snprintf's *untruncated*
#: length, reading past the buffer for names over ~80 bytes; 63 (a DNS label) keeps well clear.
MAX_NAME_LENGTH = 63
#: twemproxy parses the weight into a C ``int``.
MAX_WEIGHT = 2**31 - 1
#: twemproxy sums weights into a ``uint32_t``.
MAX_TOTAL_WEIGHT = 2**32 - 1

_NAME_RE = re.compile(rf"[a-z0-9.-]{{1,{MAX_NAME_LENGTH}}}")
_unpack_u32 = struct.Struct("<I").unpack_from


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard: a stable logical ``name`` (its ketama identity) and a positive integer ``weight``."""

    name: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"shard name must be a str, got {self.name!r}")
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"invalid shard name {self.name!r}: must be 1..{MAX_NAME_LENGTH} characters of [a-z0-9.-]"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, int):
            raise TypeError(f"weight of shard {self.name!r} must be an int, got {self.weight!r}")
        if not 1 <= self.weight <= MAX_WEIGHT:
            raise ValueError(
                f"invalid weight {self.weight!r} for shard {self.name!r}: "
                f"must be an integer in 1..{MAX_WEIGHT}"
            )


class Ring:
    """Immutable ketama ring over ``shards``.

    ``node_for(key)`` equals the server nutcracker 0.5.0 picks for the same key with the servers
    configured as ``host:port:weight name`` (``hash: md5``, ``distribution: ketama``, no ``hash_tag``,
    no ejected hosts). ``str`` keys are hashed as their UTF-8 bytes. The order of ``shards`` does not
    affect routing (twemproxy sorts its servers by name; equal points go to the shorter, then bytewise
    smaller, name).
    """

    __slots__ = ("_owners", "_points", "_shards", "_share")

    def __init__(self, shards: Iterable[ShardSpec]) -> None:
        specs = tuple(shards)
        if not specs:
            raise ValueError("a Ring needs at least one shard")
        seen: set[str] = set()
        for spec in specs:
            if not isinstance(spec, ShardSpec):
                raise TypeError(f"Ring takes ShardSpec objects, got {spec!r}")
            if spec.name in seen:
                raise ValueError(f"duplicate shard name {spec.name!r}")
            seen.add(spec.name)
        total = sum(spec.weight for spec in specs)
        if total > MAX_TOTAL_WEIGHT:
            raise ValueError(
                f"total weight {total} exceeds {MAX_TOTAL_WEIGHT} (twemproxy sums weights into a uint32)"
            )

        # Keep only the first point of each run of equal values: ketama_dispatch's lower bound can
        # never land on the later ones. owners[i] serves hashes in (points[i-1], points[i]]; the
        # extra owners[-1] = owners[0] is the wrap-around past the last point.
        points: list[int] = []
        owners: list[str] = []
        for value, index in continuum([(s.name, s.weight) for s in specs]):
            if points and points[-1] == value:
                continue
            points.append(value)
            owners.append(specs[index].name)
        if not points:  # unreachable: the largest share always gets >= 39 hashes
            raise AssertionError("empty continuum")
        owners.append(owners[0])

        owned = dict.fromkeys((s.name for s in specs), 0)
        previous = -1
        for value, owner in zip(points, owners, strict=False):
            owned[owner] += value - previous
            previous = value
        owned[owners[0]] += HASH_SPACE - 1 - points[-1]

        self._shards = specs
        self._points = points
        self._owners = owners
        self._share = {name: count / HASH_SPACE for name, count in owned.items()}

    @property
    def shards(self) -> tuple[ShardSpec, ...]:
        """The shards, in the order given."""
        return self._shards

    def node_for(self, key: str | bytes) -> str:
        """Name of the shard that owns ``key``."""
        if isinstance(key, str):
            key = key.encode()
        if key:
            return self._owners[
                bisect_left(self._points, _unpack_u32(md5(key, usedforsecurity=False).digest())[0])
            ]
        return self._owners[0]  # twemproxy hashes the empty key to 0

    def group_by_node(self, keys: Sequence[str | bytes]) -> dict[str, list[int]]:
        """Shard name -> ascending indices into ``keys`` it owns; shards owning none are left out.

        The dict follows the order of ``shards``.
        """
        points = self._points
        owners = self._owners
        groups: dict[str, list[int]] = {spec.name: [] for spec in self._shards}
        for i, key in enumerate(keys):
            if isinstance(key, str):
                key = key.encode()
            if key:
                node = owners[bisect_left(points, _unpack_u32(md5(key, usedforsecurity=False).digest())[0])]
            else:
                node = owners[0]
            groups[node].append(i)
        return {name: idx for name, idx in groups.items() if idx}

    def arcs(self) -> list[tuple[int, str]]:
        """The hash space cut into arcs, ascending: (last hash of the arc, its owner). The first arc
        starts at 0, each next one just after the previous end, and the last ends at 2**32 - 1."""
        arcs = list(zip(self._points, self._owners, strict=False))
        if self._points[-1] < HASH_SPACE - 1:
            arcs.append((HASH_SPACE - 1, self._owners[0]))   # past the last point: wraps to the first
        return arcs

    def share(self) -> dict[str, float]:
        """Fraction of the 32-bit hash space each shard owns (sums to 1.0; 0.0 for a shard with no points)."""
        return dict(self._share)

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}:{s.weight}" for s in self._shards)
        return f"Ring([{inner}])"
