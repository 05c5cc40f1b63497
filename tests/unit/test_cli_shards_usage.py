"""`crs shards` answers bad usage and configuration with exit 2 before it reads or changes anything
(`crs shards --help`: 1 is a refusal, 3 an outage). No servers: PostgreSQL is a loopback port that
refuses connections, so anything that got as far as the database would be exit 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _shards(dsn: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")}
    return subprocess.run([sys.executable, "-m", "server.cli", "shards", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=base | {"CRS_PG_DSN": dsn} | env)


@pytest.mark.parametrize("args", [("reweight", "shard-0", "--weight", "0"), ("reweight", "shard-0", "--weight", "-3"),
                                  ("add", "shard-4", "--address", "redis://127.0.0.1:6379/0", "--weight", "0"),
                                  ("add", "shard-4", "--address", "redis://127.0.0.1:6379/0", "--weight", "2.5")])
def test_a_weight_below_one_is_bad_usage(closed_dsn: str, args: tuple[str, ...]) -> None:
    """Refused while parsing: it used to reach PostgreSQL, publish version 1 from CRS_REDIS_SHARDS if
    none was, and only then be refused, exit 1."""
    r = _shards(closed_dsn, *args)
    assert r.returncode == 2 and "--weight" in r.stderr and "from 1 to" in r.stderr, r.stderr


def test_a_topology_file_that_cannot_be_used_is_configuration(closed_dsn: str, tmp_path: Path) -> None:
    broken = tmp_path / "topology.json"
    broken.write_text('{"version": 1, "shards": [')
    for path, says in ((broken, "topology.json: "), (tmp_path / "no-such-dir" / "t.json", "does not exist"),
                       (tmp_path, "cannot read it")):
        r = _shards(closed_dsn, "status", CRS_TOPOLOGY_FILE=str(path))
        assert r.returncode == 2 and "CRS_TOPOLOGY_FILE" in r.stderr and says in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
    r = _shards(closed_dsn, "status", CRS_TOPOLOGY_FILE=str(tmp_path / "not-yet.json"))   # publishing creates it
    assert r.returncode == 3 and "ConnectionRefusedError" in r.stderr, r.stderr


@pytest.mark.parametrize("limit", ["0", "-1", "x"])
def test_a_history_limit_below_one_is_bad_usage(closed_dsn: str, limit: str) -> None:
    """--limit -1 reached PostgreSQL and came back as exit 3 ("InvalidRowCountInLimitClauseError": an
    outage, to a script); --limit 0 printed "no topology published yet" whatever was published."""
    r = _shards(closed_dsn, "history", "--limit", limit)
    assert r.returncode == 2 and "--limit" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args", [("add", "shard-4", "--address", "redis-4:6379"),
                                  ("add", "shard-4", "--address", "http://redis-4:6379/0", "--no-check"),
                                  ("add", "shard-4", "--address", "redis://redis-4:637900/0"),
                                  ("add-replica", "shard-0", "redis-0b:6379")])
def test_an_address_that_is_no_redis_url_is_bad_usage(closed_dsn: str, args: tuple[str, ...]) -> None:
    """A mistyped address was probed first: "does not answer (ValueError ...); start it first", exit 3,
    as if the shard were down (with --no-check: exit 1, a refusal). Refused while parsing, exit 2."""
    r = _shards(closed_dsn, *args)
    assert r.returncode == 2 and "redis://" in r.stderr and "does not answer" not in r.stderr, r.stderr


@pytest.mark.parametrize("command", [("apply",), ("abort",), ("add-replica", "shard-0", "redis://127.0.0.1:6390/0"),
                                     ("remove-replica", "shard-0", "redis://127.0.0.1:6390/0")])
@pytest.mark.parametrize("seconds", ["-5", "0", "nan"])
def test_a_wait_timeout_that_is_no_time_to_wait_is_bad_usage(closed_dsn: str, command: tuple[str, ...],
                                                              seconds: str) -> None:
    """--wait-timeout -5 published the first version, waited not at all and failed "after -5s", exit 1
    (a refusal), with a replica change half done. Refused while parsing, exit 2, nothing published."""
    r = _shards(closed_dsn, *command, "--wait-timeout", seconds)
    assert r.returncode == 2 and "--wait-timeout" in r.stderr, r.stderr
