"""`crs-dev load-demo` and `crs-dev up` refuse what they cannot use in one line, exit 2 (`crs-dev --help`),
before any server starts or any database is written: no CRS_PG_DSN (libpq's default database is
never guessed), a busy --port, a --data-dir that is no writable directory, numbers out of range.
No servers: PostgreSQL is a loopback port that refuses connections (`crs-dev up --customers 0` on
the real stack: tests/integration/test_dev_up.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.cli import main as crs_dev
from server.crypto import generate_keys


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Neither CRS_* nor libpq's PG* variables of the machine running the tests."""
    import os

    for name in list(os.environ):
        if name.startswith(("CRS_", "PG")):
            monkeypatch.delenv(name)
    return monkeypatch


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_load_demo_without_a_dsn_names_the_setting(environ: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """It used to connect to libpq's default (127.0.0.1:5432 as the current user): maybe another database."""
    environ.setenv("PGHOST", "127.0.0.1")     # what libpq would have used: still refused
    assert crs_dev(["load-demo", "--customers", "5"]) == 2
    assert "CRS_PG_DSN is not set" in _one_line(capsys)


def test_load_demo_checks_keys_then_says_postgresql_is_down(environ: pytest.MonkeyPatch, closed_dsn: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    environ.setenv("CRS_PG_DSN", closed_dsn)
    assert crs_dev(["load-demo", "--customers", "5"]) == 2               # no keys: before any write
    assert "CRS_FINGERPRINT_KEYS" in _one_line(capsys)
    for name, value in generate_keys().items():
        environ.setenv(name, value)
    assert crs_dev(["load-demo", "--customers", "5"]) == 3
    assert "PostgreSQL unavailable" in _one_line(capsys)
    environ.setenv("CRS_PG_DSN", "postgresql://crs:s3cret-pw@127.0.0.1:70000/crs")
    assert crs_dev(["load-demo", "--customers", "5"]) == 2
    err = _one_line(capsys)
    assert "CRS_PG_DSN: a port is not a number from 1 to 65535" in err and "s3cret" not in err


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_up_on_a_busy_port_is_refused_before_anything_starts(environ: pytest.MonkeyPatch, busy_port: int,
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """It used to start PostgreSQL and Redis, load the demo data, and only then fail with a traceback
    when the node could not listen."""
    data = tmp_path / "data"
    assert crs_dev(["up", "--port", str(busy_port), "--customers", "1", "--data-dir", str(data)]) == 2
    err = _one_line(capsys)
    assert f"--port {busy_port}" in err and "already in use" in err
    assert not data.exists()


def test_up_with_a_data_dir_it_cannot_use(environ: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for data_dir, said in ((a_file, f"--data-dir {a_file} is not a directory"),
                           (a_file / "below", f"--data-dir {a_file / 'below'}: {a_file} is not a directory")):
        assert crs_dev(["up", "--port", "1", "--customers", "1", "--data-dir", str(data_dir)]) == 2
        assert said in _one_line(capsys)


@pytest.mark.parametrize("args, flag", [(("--customers", "-1"), "--customers"), (("--port", "70000"), "--port"),
                                        (("--port", "0"), "--port"), (("--workers", "0"), "--workers"),
                                        (("--shards", "65"), "--shards"), (("--replicas", "-2"), "--replicas")])
def test_up_numbers_out_of_range_are_usage_errors(environ: pytest.MonkeyPatch, args: tuple[str, ...], flag: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        crs_dev(["up", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: " in err and "is not a whole number" in err, err
    assert "Traceback" not in err


def test_load_demo_needs_one_customer_at_least(environ: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        crs_dev(["load-demo", "--customers", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --customers: '0' is not a whole number 1 or more" in err, err
