"""constraints.txt, the versions every install resolves to (./crsw, the Dockerfile), against
pyproject.toml's ranges: every direct dependency pinned, and each pin within its range, so a pin moved
by hand (or a range narrowed) cannot leave installs that pip refuses or tests never ran."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and canonicalize_name(name) not in pins, f"not one exact pin a package: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_is_pinned_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue      # not installed here (pgserver past Python 3.12)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name} {pins[name]}, outside pyproject.toml's {req.specifier}"


def test_the_installs_use_the_pins() -> None:
    assert '-c "$here/constraints.txt"' in (ROOT / "crsw").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install -c constraints.txt ." in dockerfile and "constraints.txt ./" in dockerfile
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text()
