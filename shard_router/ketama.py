"""twemproxy (nutcracker) ``distribution: ketama`` + ``hash: md5``, reproduced bit for bit.

Pure functions, no I/O. ``shard_router.ring.Ring`` builds on them; the tests use them to pin the
tie and boundary behaviour. The algorithm and the evidence that it matches nutcracker 0.5.0 key for
key are in docs/ring.md.

Reference: twemproxy ``src/hashkit/nc_ketama.c`` (``ketama_update``, ``ketama_dispatch``) and
``src/nc_server.c`` (``server_pool_hash``, ``server_pool_idx``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from hashlib import md5

__all__ = [
    "HASH_SPACE",
    "POINTS_PER_SERVER",
    "continuum",
    "dispatch",
    "hashes_per_server",
    "key_hash",
    "point_values",
    "server_order",
]

#: KETAMA_POINTS_PER_SERVER: points per server when all weights are equal (40 MD5s x 4 points).
POINTS_PER_SERVER = 160
#: Each MD5 digest gives this many 32-bit points (KETAMA "pointer_per_hash").
POINTS_PER_HASH = 4
#: Size of the 32-bit hash space the points and key hashes live in.
HASH_SPACE = 1 << 32

_F32 = struct.Struct("<f")
_U32X4 = struct.Struct("<4I")
_U32 = struct.Struct("<I")


def _f32(x: float) -> float:
    """Round a double to the nearest IEEE-754 binary32 value (C's ``(float)x``)."""
    return float(_F32.unpack(_F32.pack(x))[0])


def hashes_per_server(weight: int, total_weight: int, nlive_server: int) -> int:
    """Number of MD5 hashes (4 points each) twemproxy gives one server.

    C original (``float pct``; every operand below is a ``float`` except the ``double`` literal)::

        pct = (float)server->weight / (float)total_weight;
        pointer_per_server = (uint32_t)((floorf((float)(pct * KETAMA_POINTS_PER_SERVER / 4
                                          * (float)nlive_server + 0.0000000001))) * 4);

    Each binary32 ``*`` and ``/`` is the exact result rounded once to binary32; computing it in
    double and rounding to binary32 gives the same value (53 >= 2 * 24 + 2). The ``+ 1e-10`` is done
    in double and rounded back to float, so it never changes a nonzero value: e.g. 25 equal servers
    get 39 hashes (156 points) each, not 40, because (float)(1/25) * 40 * 25 = 39.999996.
    """
    pct = _f32(_f32(float(weight)) / _f32(float(total_weight)))
    x = _f32(pct * float(POINTS_PER_SERVER))
    x = _f32(x / float(POINTS_PER_HASH))
    x = _f32(x * _f32(float(nlive_server)))
    return math.floor(_f32(x + 0.0000000001))


def point_values(name: str, nhashes: int) -> list[int]:
    """The continuum values of one server, in twemproxy's generation order.

    Hash ``i`` (0-based) is MD5 of ``"<name>-<i>"``; its digest gives 4 points, the little-endian
    uint32 of bytes 0..3, 4..7, 8..11, 12..15 in that order.
    """
    out: list[int] = []
    for i in range(nhashes):
        out.extend(_U32X4.unpack(md5(f"{name}-{i}".encode(), usedforsecurity=False).digest()))
    return out


def server_order(names: Sequence[str]) -> list[int]:
    """Indices of ``names`` in the order twemproxy keeps its servers: shorter name first, then bytewise.

    ``conf_validate_server`` sorts the pool's servers with ``string_compare`` (length first, then
    ``strncmp``) to look for duplicate names, and never restores the config order. So the continuum is
    built in this order whatever order the config lists the servers in.
    """
    return sorted(range(len(names)), key=lambda i: (len(names[i].encode()), names[i].encode()))


def continuum(servers: Sequence[tuple[str, int]]) -> list[tuple[int, int]]:
    """The sorted continuum of ``(value, server_index)`` for ``(name, weight)`` servers.

    ``server_index`` indexes ``servers`` as given. Points are generated server by server in
    ``server_order`` and then sorted with ``qsort`` comparing the value only. glibc's ``qsort`` is a
    stable merge sort for arrays this size, so equal values keep generation order: the point of the
    server whose name sorts first (shorter, then bytewise) comes first, and ``ketama_dispatch``'s lower
    bound picks it. Python's ``sort`` is stable too, so sorting on the value alone gives that order.
    The config order of the servers never matters.
    """
    n = len(servers)
    total = sum(w for _, w in servers)
    points: list[tuple[int, int]] = []
    for index in server_order([name for name, _ in servers]):
        name, weight = servers[index]
        for value in point_values(name, hashes_per_server(weight, total, n)):
            points.append((value, index))
    points.sort(key=lambda p: p[0])
    return points


def dispatch(values: Sequence[int], hash_value: int) -> int:
    """Index into the sorted continuum ``values`` for ``hash_value``: twemproxy's ``ketama_dispatch``.

    It is a lower bound (the first point whose value is >= hash, hence the *first* of several equal
    points), wrapping to index 0 past the last point. Reference version, not the fast path.
    """
    left, right = 0, len(values)
    while left < right:
        middle = left + (right - left) // 2
        if values[middle] < hash_value:
            left = middle + 1
        else:
            right = middle
    return 0 if right == len(values) else right


def key_hash(key: bytes) -> int:
    """twemproxy's key hash for ``hash: md5``: little-endian uint32 of MD5 bytes 0..3.

    ``server_pool_hash`` short-cuts the empty key to hash 0 (it never calls MD5 for it), so the empty
    key goes to the first point of the continuum rather than to MD5("")'s 0xd98c1dd4.
    """
    if not key:
        return 0
    return int(_U32.unpack_from(md5(key, usedforsecurity=False).digest())[0])
