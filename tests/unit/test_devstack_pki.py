"""devstack/pki.py writes private keys 0600 from the start: never readable by others, not even between
being written and a chmod (F6), whatever the umask and whatever mode an older file had."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import pki


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_never_readable_by_others(tmp_path: Path, usual_umask: None, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int, int]] = []      # (name, mode, size) of a file a chmod is about to narrow
    real_chmod = os.chmod

    def spy(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        p = Path(path)
        seen.append((p.name, _mode(p), p.stat().st_size))
        real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(pki.os, "chmod", spy)
    old = tmp_path / "ca.key"
    old.write_bytes(b"")
    real_chmod(old, 0o644)                          # a file from before, readable by others
    pki.write_dev_pki(tmp_path, clients=("admin",))
    assert not [s for s in seen if s[2] and s[1] & 0o077], seen     # never a key in a file others can read
    keys = sorted(tmp_path.glob("*.key"))
    assert {k.name for k in keys} == {"ca.key", "server.key", "client-admin.key"}
    assert all(_mode(k) == 0o600 and k.read_bytes().startswith(b"-----BEGIN") for k in keys)
    assert all(_mode(c) == 0o644 for c in tmp_path.glob("*.pem"))   # certificates: as before
