"""`crs --help` promises exit 3 when a dependency is down: every command that talks to PostgreSQL
directly says so in one line on stderr (server/cli/base.py `postgres_errors`), never a traceback;
configuration it cannot use (no DSN, a port no connection can use, a TOML value of the wrong type) is
exit 2, also in one line. No servers: PostgreSQL is a loopback port that refuses connections.
(`crs bins`: test_cli_bins.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli.base import CommandFailed, dsn_ports_usable, require_dsn

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



@pytest.mark.parametrize("dsn", ["postgresql://crs:s3cret-pw@127.0.0.1:70000/crs", "postgresql://crs:s3cret-pw@db:x/crs",
                                 "postgresql://crs:s3cret-pw@pg-a:5432,pg-b:-5/crs", "postgres://crs:s3cret-pw@[::1]:0/crs"])
def test_a_dsn_port_no_connection_can_use_is_bad_configuration(dsn: str) -> None:
    """The audit's reproduction (`crs shards status` with port 70000): a traceback (OverflowError from
    connect(); ValueError for "x") instead of one line, exit 2, without the DSN's password."""
    assert not dsn_ports_usable(dsn)
    with pytest.raises(CommandFailed) as info:
        require_dsn(dsn, "CRS_PG_READ_DSN")
    assert info.value.code == 2 and str(info.value) == "CRS_PG_READ_DSN: a port is not a number from 1 to 65535"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRS_", "PG"))} | {"CRS_PG_DSN": dsn}
    r = subprocess.run([sys.executable, "-m", "server.cli", "shards", "status"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "s3cret" not in r.stderr, r.stderr
    assert "CRS_PG_DSN: a port is not a number from 1 to 65535" in r.stderr


@pytest.mark.parametrize("dsn", ["postgresql://crs:pw@127.0.0.1:65535/crs", "postgresql://crs@h1:5432,h2/crs",
                                 "postgresql:///crs?host=/var/run/postgresql", "postgresql://[::1]/crs",
                                 "postgresql://crs@[::1]:5432/crs?target_session_attrs=read-write", "garbage"])
def test_usable_dsn_ports_pass(dsn: str) -> None:
    assert dsn_ports_usable(dsn)
    require_dsn(dsn)


def test_a_non_string_redis_shards_in_the_config_file_is_one_line(closed_dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "crs.toml"
    config.write_text('redis_shards = ["shard-0=redis://:s3cret-pw@127.0.0.1:6379/0"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRS_", "PG"))}
    r = subprocess.run([sys.executable, "-m", "server.cli", "shards", "status"], cwd=ROOT,
                       env=env | {"CRS_PG_DSN": closed_dsn, "CRS_CONFIG": str(config)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "s3cret" not in r.stderr, r.stderr
    assert "redis_shards in a config file must be one string (got list)" in r.stderr
