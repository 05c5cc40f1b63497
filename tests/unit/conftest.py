"""What the unit tests share. No servers here: a command that would reach PostgreSQL meets `closed_dsn`."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def closed_dsn() -> Iterator[str]:
    """A DSN whose port refuses connections: bound (so nothing else takes it) but not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"postgresql://crs@127.0.0.1:{s.getsockname()[1]}/crs"
