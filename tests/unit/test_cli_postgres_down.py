"""`crs --help` promises exit 3 when a dependency is down: every command that talks to PostgreSQL
directly says so in one line on stderr (server/cli/base.py `postgres_errors`), never a traceback.
No servers: PostgreSQL is a loopback port that refuses connections. (`crs bins`: test_cli_bins.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [("audit",), ("keys", "status"), ("migrate",), ("shards", "status")])
def test_postgresql_unreachable_is_exit_3_in_one_line(closed_dsn: str, command: tuple[str, ...]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | {"CRS_PG_DSN": closed_dsn}
    r = subprocess.run([sys.executable, "-m", "server.cli", *command], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "ConnectionRefusedError" in r.stderr


def test_a_postgresql_that_never_answers_is_exit_3_within_the_connect_timeout() -> None:
    """A host that takes the connection and says nothing (a black-holed or hung PostgreSQL): the
    command gives up after CRS_PG_TIMEOUT x 5, not asyncpg's default minute."""
    import time

    with socket.socket() as silent:   # listening: the kernel completes the handshake, nothing answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dsn = f"postgresql://crs@127.0.0.1:{silent.getsockname()[1]}/crs"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | {"CRS_PG_DSN": dsn,
                                                                                    "CRS_PG_TIMEOUT": "0.4"}
        started = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "server.cli", "audit"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
        took = time.monotonic() - started
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert took < 15, f"{took:.1f}s: the connect waited for asyncpg's default timeout"


@pytest.mark.parametrize("command", [("audit",), ("keys", "status"), ("migrate",), ("bins", "versions"),
                                     ("import", "customers", "{file}", "--source", "s", "--report", "{report}"),
                                     ("shards", "status")])
def test_no_dsn_is_bad_configuration_not_a_guess(tmp_path: Path, command: tuple[str, ...]) -> None:
    """Without CRS_PG_DSN asyncpg would try libpq's defaults (127.0.0.1:5432, PG* variables): maybe
    another database. It is exit 2 naming the setting, before anything is read or written."""
    source = tmp_path / "in.csv"
    source.write_text("source_ref,given_name\nA-1,Ann\n")
    argv = [a.format(file=source, report=tmp_path / "report.csv") for a in command]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRS_", "PG"))}
    r = subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "CRS_PG_DSN is not set" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "report.csv").exists()


@pytest.mark.parametrize("command", [("audit",), ("keys", "status"), ("migrate",), ("shards", "status")])
@pytest.mark.parametrize("dsn", ["garbage", "mysql://crs:s3cret-pw@127.0.0.1/crs",
                                 "postgresql://crs:s3cret-pw@127.0.0.1/crs?sslmode=sometimes"])
def test_a_dsn_the_driver_cannot_use_is_bad_configuration(command: tuple[str, ...], dsn: str) -> None:
    """Not an outage (exit 3, "PostgreSQL unavailable: ClientConfigurationError"): nothing was reached.
    Exit 2 naming CRS_PG_DSN, in one line, without the password it holds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRS_", "PG"))} | {"CRS_PG_DSN": dsn}
    r = subprocess.run([sys.executable, "-m", "server.cli", *command], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "CRS_PG_DSN cannot be used" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "s3cret" not in r.stderr, r.stderr
