"""Running PostgreSQL when we are root.

``initdb`` and ``postgres`` refuse to run as root, so when ``os.geteuid() == 0`` they run as an
unprivileged user (``nobody``, else a system user ``crs-pg`` created with ``useradd --system``),
with root's supplementary groups dropped. The data directory is created by us and chowned to that
user; a directory we did not create is never chmod-ed or chown-ed. When that user cannot execute
the binaries where they are (e.g. a venv under ``/root``, mode 700), the install tree is copied to
a world-readable temporary directory (once per process) and run from there.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Final

from devstack.binaries import is_executable
from devstack.processes import EmbeddedServerError, RunAs, exec_argv

_PG_USER_CANDIDATES: Final = ("nobody",)
_PG_CREATED_USER: Final = "crs-pg"


# --------------------------------------------------------------------------------------------------
# Root handling for PostgreSQL
# --------------------------------------------------------------------------------------------------

_run_as_lock = threading.Lock()
_run_as_cache: list[RunAs | None] = []


def pg_run_as() -> RunAs | None:
    """None when we are not root; else the unprivileged user to run initdb/postgres as."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    with _run_as_lock:
        if _run_as_cache:
            return _run_as_cache[0]
        for name in (*_PG_USER_CANDIDATES, _PG_CREATED_USER):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                if entry.pw_uid != 0 and entry.pw_gid != 0:
                    found = RunAs(name, entry.pw_uid, entry.pw_gid)
                    _run_as_cache.append(found)
                    return found
        useradd = shutil.which("useradd")
        if useradd is None:
            raise EmbeddedServerError(
                "running as root, PostgreSQL needs an unprivileged user: there is no 'nobody' user and no"
                f" useradd to create '{_PG_CREATED_USER}'"
            )
        result = subprocess.run(
            [
                useradd,
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                _PG_CREATED_USER,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode not in (0, 9):  # 9: the user exists already (created concurrently)
            raise EmbeddedServerError(
                f"could not create system user '{_PG_CREATED_USER}' for PostgreSQL:"
                f" {result.stderr.strip() or result.returncode}"
            )
        entry = pwd.getpwnam(_PG_CREATED_USER)
        created = RunAs(_PG_CREATED_USER, entry.pw_uid, entry.pw_gid)
        _run_as_cache.append(created)
        return created


def probe_as(run_as: RunAs, script: str, *args: str | Path) -> bool:
    """Run a tiny shell test as ``run_as`` (ground truth, ACLs included); True when it succeeds."""
    result = subprocess.run(
        exec_argv(["/bin/sh", "-c", script, "sh", *args], run_as=run_as, death_signal=0),   # vfork: see exec_argv
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0


def _mode_allows(st: os.stat_result, run_as: RunAs, bits: int) -> bool:
    """Classic mode-bit check (no ACLs) of ``bits`` (a combination of 4=r, 2=w, 1=x) for ``run_as``."""
    if st.st_uid == run_as.uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid == run_as.gid:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def blocking_ancestor(path: Path, run_as: RunAs) -> str:
    """Explain which directory above ``path`` ``run_as`` cannot traverse (for error messages)."""
    for ancestor in reversed([path, *path.parents]):
        try:
            st = ancestor.stat()
        except OSError:
            break
        if not _mode_allows(st, run_as, 1):
            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                owner = str(st.st_uid)
            return f"{ancestor} (mode {stat.S_IMODE(st.st_mode):04o}, owner {owner}) is not traversable by it"
    return "it is not reachable by it"


def _pg_config_dirs(bindir: Path) -> list[Path]:
    """sharedir and pkglibdir as ``pg_config`` reports them (empty when there is no pg_config)."""
    pg_config = bindir / "pg_config"
    if not is_executable(pg_config):
        return []
    try:
        result = subprocess.run(
            [str(pg_config), "--sharedir", "--pkglibdir"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [Path(line) for line in result.stdout.splitlines() if line.strip()]


def _bindir_usable_by(bindir: Path, run_as: RunAs) -> bool:
    dirs = _pg_config_dirs(bindir)
    script = 'test -x "$1/initdb" && test -x "$1/postgres" && "$1/initdb" -V >/dev/null && "$1/postgres" -V >/dev/null'
    args: list[str | Path] = [bindir]
    if len(dirs) == 2:
        script += ' && test -r "$2/postgres.bki" && test -x "$3" && test -r "$3"'
        args += dirs
    return probe_as(run_as, script, *args)


_copies_lock = threading.Lock()
_copies: dict[tuple[Path, int], Path] = {}
_copy_roots: list[Path] = []


def _open_up(root: Path) -> None:
    """World-readable permissions on a tree we just created (never used on anything else)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                continue
            extra = 0o444 | (0o111 if st.st_mode & stat.S_IXUSR else 0)
            os.chmod(full, stat.S_IMODE(st.st_mode) | extra)


def readable_bindir(bindir: Path, run_as: RunAs) -> Path:
    """``bindir`` if ``run_as`` can use it, else the bindir of a copy of its install tree it can use."""
    key = (bindir, run_as.uid)
    with _copies_lock:
        if key in _copies:
            return _copies[key]
        if _bindir_usable_by(bindir, run_as):
            _copies[key] = bindir
            return bindir
        prefix = bindir.parent
        if not (prefix / "share").is_dir():
            raise EmbeddedServerError(
                f"PostgreSQL runs as user '{run_as.name}' (we are root) but cannot use the binaries in"
                f" {bindir}: {blocking_ancestor(bindir, run_as)}, and {prefix} does not look like a"
                " relocatable install tree to copy; use binaries='pgserver' or another bindir"
            )
        root = Path(tempfile.mkdtemp(prefix="crs-pginstall-"))
        _copy_roots.append(root)
        # Keep the layout pgserver's RPATH ($ORIGIN/../../../pgserver.libs) expects:
        # <pkg>/<prefix> next to <pkg>.libs
        package = prefix.parent
        target_prefix = root / package.name / prefix.name
        shutil.copytree(prefix, target_prefix, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, root / libs.name, symlinks=True)
        _open_up(root)
        copied = target_prefix / bindir.name
        if not _bindir_usable_by(copied, run_as):
            raise EmbeddedServerError(
                f"PostgreSQL runs as user '{run_as.name}' (we are root); the binaries in {bindir} were not"
                f" usable by it and neither is the copy in {target_prefix}"
            )
        _copies[key] = copied
        return copied


def _remove_copies_at_exit() -> None:
    with _copies_lock:
        for root in _copy_roots:
            shutil.rmtree(root, ignore_errors=True)
        _copy_roots.clear()
        _copies.clear()


atexit.register(_remove_copies_at_exit)
