"""loadtests/device/requirements.txt, the wheels carried to the device machine (no package index
there), holds every package the node, the embedded stack and locust need, each at a version
pyproject.toml allows: when a pin there moves, this fails until the list is regenerated."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def test_the_device_wheels_cover_what_the_sweep_runs_at_allowed_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["stack"]]
    needed += [Requirement(r) for r in project["optional-dependencies"]["load"] if r.startswith("locust")]
    pinned: dict[str, str] = {}
    for line in (ROOT / "loadtests/device/requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pinned[canonicalize_name(name)] = version
    for req in needed:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in loadtests/device/requirements.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{req.name}=={pinned[name]} vs {req}"
        for extra in req.extras:           # redis[hiredis], pyjwt[crypto]: the extra's package too
            assert {"hiredis": "hiredis", "crypto": "cryptography"}[extra] in pinned, req
