"""The commands that call a node (`crs lookup`, `feed tail`, `export`, `identity ...`, `crs-dev lookup`)
answer bad connection arguments with one line naming the flag, exit 2 (`crs --help`), before any
connection: a TLS file that is missing, unreadable or holds no PEM, and a flag that would be silently
ignored. A bearer token is never sent over plaintext: `--token-file` without TLS is refused, and the
token itself is never echoed. No servers: the target is a loopback port nothing listens on."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.cli import main as crs_dev
from devstack.pki import write_dev_pki
from server.cli.main import main as crs

TOKEN = "eyJhbGciOiJFUzI1NiJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl"   # a made-up JWT: it must never be printed
COMMANDS = [("lookup", "card"), ("feed", "tail"), ("export", "--out", "{tmp}/extract"), ("identity", "reviews")]


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with socket.socket() as s:   # bound, not listening: a call that got this far would be refused
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def _run(cli: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli(argv)
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and "Traceback" not in captured.err, captured.err
    assert TOKEN not in captured.out + captured.err
    return code, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev PKI (ca.pem, client-switch.pem/.key), a token file and files that are none of these."""
    tmp_path = tmp_path_factory.mktemp("tls")
    pki = write_dev_pki(tmp_path, ("switch",))
    cert, key = pki.client_cert("switch")
    cert.rename(tmp_path / "client.pem")
    key.rename(tmp_path / "client.key")
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "not-pem").write_text("hello\n")
    (tmp_path / "unreadable").mkdir()      # a directory: unreadable as a file, also for root
    return tmp_path


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("tls, said", [
    (("--ca", "{tmp}/missing.pem"), "--ca: cannot read {tmp}/missing.pem: No such file or directory"),
    (("--ca", "{tmp}/unreadable"), "--ca: cannot read {tmp}/unreadable: Is a directory"),
    (("--ca", "{tmp}/not-pem"), "--ca: {tmp}/not-pem holds no PEM certificate"),
    (("--ca", "{tmp}/ca.pem", "--cert", "{tmp}/client.pem", "--key", "{tmp}/missing.key"),
     "--key: cannot read {tmp}/missing.key"),
    (("--ca", "{tmp}/ca.pem", "--cert", "{tmp}/client.pem", "--key", "{tmp}/not-pem"),
     "--key: {tmp}/not-pem holds no PEM private key"),
    (("--tls-dir", "{tmp}", "--client", "nobody"), "--tls-dir (--client nobody): cannot read {tmp}/client-nobody"),
])
def test_a_tls_file_that_cannot_be_used_is_one_line_exit_2(files: Path, target: str, command: tuple[str, ...],
                                                           tls: tuple[str, ...], said: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(tmp=files) for a in (*command, *tls)] + ["--target", target]
    code, err = _run(crs, argv, capsys)
    assert code == 2 and said.format(tmp=files) in err
    assert not (files / "extract").exists()      # export: refused before --out is created


@pytest.mark.parametrize("flags, said", [
    (("--token-file", "{tmp}/token"), "--token-file needs TLS (--ca or --tls-dir)"),
    (("--cert", "{tmp}/client.pem", "--key", "{tmp}/client.key"), "--cert/--key need --ca"),
    (("--ca", "{tmp}/ca.pem", "--cert", "{tmp}/client.pem"), "--cert and --key go together"),
    (("--tls-dir", "{tmp}", "--ca", "{tmp}/ca.pem"), "--tls-dir and --ca both name TLS files"),
    (("--ca", "{tmp}/ca.pem", "--token-file", "{tmp}/ca.pem"), "--token-file: {tmp}/ca.pem is not a token"),
    (("--ca", "{tmp}/ca.pem", "--token-file", "{tmp}/missing"), "--token-file: cannot read {tmp}/missing"),
    (("--server-name", "crs-node.crs.svc"), "--server-name needs TLS"),
])
def test_a_flag_that_would_be_ignored_or_sent_in_clear_is_refused(files: Path, target: str, flags: tuple[str, ...],
                                                                  said: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`--token-file` without `--ca` used to be dropped silently: the call went out in plaintext without
    the token (or, had it been added, with the token readable by every hop). Refused instead."""
    for command in COMMANDS:
        argv = [a.format(tmp=files) for a in (*command, *flags)] + ["--target", target]
        code, err = _run(crs, argv, capsys)
        assert code == 2 and said.format(tmp=files) in err, (command, err)


def test_crs_dev_lookup_shares_the_checks(files: Path, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(crs_dev, ["lookup", "card", "--demo", "7", "--ca", str(files / "missing.pem"),
                               "--target", target], capsys)
    assert code == 2 and err.startswith("crs-dev: --ca: cannot read")
    code, err = _run(crs_dev, ["lookup", "card", "--demo", "7", "--token-file", str(files / "token"),
                               "--target", target], capsys)
    assert code == 2 and "--token-file needs TLS" in err


def test_usable_files_reach_the_node(files: Path, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The checks let good arguments through: the call is made, and fails as an unreachable node does
    (UNAVAILABLE, exit 1), token and all."""
    code, err = _run(crs, ["identity", "reviews", "--ca", str(files / "ca.pem"), "--cert", str(files / "client.pem"),
                           "--key", str(files / "client.key"), "--token-file", str(files / "token"),
                           "--target", target, "--timeout", "2"], capsys)
    assert code == 1 and err.startswith("UNAVAILABLE"), err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_a_timeout_that_is_no_time_to_wait_is_bad_usage(tmp_path: Path, target: str, command: tuple[str, ...],
                                                       seconds: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--timeout 0 (meant as "no limit", as feed tail and export have by default) or -1 was sent as a
    deadline already past: DEADLINE_EXCEEDED, exit 1, as if the node were too slow; export had by
    then created --out. Refused while parsing, exit 2, nothing created."""
    argv = [a.format(tmp=tmp_path) for a in command] + ["--target", target, "--timeout", seconds]
    with pytest.raises(SystemExit) as ended:
        crs(argv)
    assert ended.value.code == 2 and "--timeout" in capsys.readouterr().err
    assert not (tmp_path / "extract").exists()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("address", ["", " ", "127.0.0.1:1 ", "a\tb:1"])
def test_a_target_that_is_no_address_is_bad_usage(tmp_path: Path, command: tuple[str, ...], address: str,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """An empty --target made grpc's C core print its own lines ("no server name supplied in dns URI",
    a source location trace) before the one-line error, exit 1 as if a node were down. Refused while
    parsing, exit 2, one line, nothing created."""
    argv = [a.format(tmp=tmp_path) for a in command] + ["--target", address, "--timeout", "1"]
    with pytest.raises(SystemExit) as ended:
        crs(argv)
    err = capfd.readouterr().err
    assert ended.value.code == 2 and "--target" in err and "is not a node address" in err, err
    assert "dns_resolver" not in err and not (tmp_path / "extract").exists()


def test_an_export_to_an_unreachable_node_leaves_no_empty_out(tmp_path: Path, target: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--out was created before the Snapshot call and left behind, empty, when the node did not answer;
    a directory that was there before stays."""
    out = tmp_path / "new" / "extract"
    code, err = _run(crs, ["export", "--out", str(out), "--target", target, "--timeout", "5"], capsys)
    assert code == 1 and err.startswith("UNAVAILABLE: "), err
    assert not out.exists()
    out.mkdir()
    code, _ = _run(crs, ["export", "--out", str(out), "--target", target, "--timeout", "5"], capsys)
    assert code == 1 and out.is_dir()


@pytest.mark.parametrize("argv", [["merge", "cus_a", "cus_b"], ["unmerge", "cus_b"], ["accept", "rev_abcd"]])
def test_identity_writes_that_merge_wait_long_enough_for_a_big_customer(argv: list[str]) -> None:
    """A merge of a customer with 24,000 accounts took 7-8 s: at the lookups' 5 s default the CLI said
    DEADLINE_EXCEEDED for a merge that had committed. Reads keep 5 s."""
    from server.cli.main import build_parser
    parser = build_parser()
    assert parser.parse_args(["identity", *argv]).timeout == 120
    assert parser.parse_args(["identity", "show", "cus_a"]).timeout == 5
    assert parser.parse_args(["identity", *argv, "--timeout", "9"]).timeout == 9
