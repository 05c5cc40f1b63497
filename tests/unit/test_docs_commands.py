"""Every `crs`, `crs-dev` and `crs-load` command the README, docs/ and the runbooks show exists, with
the flags it is shown with (an outside check found a runbook's `crs audit --since 10m`: the flag is
`--hours`). Checked against the real parsers, not their --help text."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from devstack.cli import build_parser as crs_dev
from loadtests.cli import RUNNERS
from loadtests.cli import build_parser as crs_load
from server.cli.main import build_parser as crs

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {"crs": crs(), "crs-dev": crs_dev(), "crs-load": crs_load()}
# A command name where a command would start: not `kubectl -n crs ...`, not a path or a longer name.
INVOCATION = re.compile(r"(?<![-\w/.=])(crs|crs-dev|crs-load)((?:[ \t]+[^\s`|;&)\"'#<>\]]+)+)")
KUBECTL = re.compile(r"(-n|--namespace)[ =]$")
WORD = re.compile(r"[a-z][a-z0-9-]*")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "k8s").rglob("*.md"))]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def problems_in(text: str, where: str) -> list[str]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in INVOCATION.finditer(line):
            if KUBECTL.search(line[:m.start()]):
                continue
            prog, words = m.group(1), m.group(2).split()
            parser, path = PARSERS[prog], [prog]
            for word in words:
                subs = _subcommands(parser)
                if not subs or not WORD.fullmatch(word):
                    break
                if word not in subs:
                    found.append(f"{where}:{lineno}: `{' '.join(path)} {word}` is no command")
                    break
                parser, path = subs[word], [*path, word]
            if prog == "crs-load" and len(path) > 1 and path[1] in RUNNERS:
                continue        # a runner parses its own arguments (checked by its own --help)
            known = _flags(parser)
            for word in words[len(path) - 1:]:
                flag = word.split("=")[0].rstrip(".,:")
                if flag.startswith("--") and flag != "--" and flag not in known:
                    found.append(f"{where}:{lineno}: `{' '.join(path)}` has no {flag}")
    return found


def test_the_checker_finds_what_it_should() -> None:
    assert problems_in("run `crs audit --since 10m` and `crs capacity`", "x") == [
        "x:1: `crs audit` has no --since", "x:1: `crs capacity` is no command"]
    assert problems_in("`crs audit --hours 1`, `kubectl -n crs get pods`, ./crsw crs-dev up --replicas 1", "x") == []


def test_every_documented_command_and_flag_exists() -> None:
    found = [p for doc in _documents() for p in problems_in(doc.read_text(), str(doc.relative_to(ROOT)))]
    assert found == []


# `crs shards` subcommands that only read; every other one changes the topology, which the nodes' own
# login may not (migration 0004: crs_operator), so `crs` refuses it (exit 2) run with a node pod's
# mounted CRS_PG_DSN_FILE. The operator login replaces that file's DSN as resharding.md shows.
READ_ONLY_SHARDS = {"status", "plan", "history"}
NODE_POD_CRS = re.compile(r"\bexec\b[^`\n]*\bcrs-node\b[^`\n]*--[ \t]+crs\b")
OPERATOR_LOGIN = "unset CRS_PG_DSN_FILE"


def test_topology_changes_are_never_shown_with_the_nodes_login() -> None:
    """A runbook that runs `crs` in a node's pod (`kubectl exec deploy/crs-node -- crs ...`: the node's
    login) and tells to change the topology must say how to run that change with an operator login."""
    shards = _subcommands(_subcommands(PARSERS["crs"])["shards"])
    assert READ_ONLY_SHARDS < set(shards)
    found = []
    for doc in _documents():
        text = doc.read_text()
        if not NODE_POD_CRS.search(text) or OPERATOR_LOGIN in text:
            continue
        changes = sorted({w for w in re.findall(r"\bcrs shards ([a-z-]+)", text) if w not in READ_ONLY_SHARDS})
        if changes:
            found.append(f"{doc.relative_to(ROOT)}: `crs shards {'/'.join(changes)}` with the node's login")
    assert found == []


def test_alert_runbooks_never_change_the_bootstrap_shard_list() -> None:
    """CRS_REDIS_SHARDS is only the ring nodes run until a topology is published (resharding.md explains
    it): editing it afterwards changes nothing, and before, a rollout with a new list has nodes on two
    rings or deleting on different copies. Alert runbooks change shards with `crs shards` only."""
    runbooks = [p for p in sorted((ROOT / "docs" / "runbooks").glob("*.md")) if p.name != "resharding.md"]
    assert len(runbooks) >= 10
    assert [p.name for p in runbooks if "CRS_REDIS_SHARDS" in p.read_text()] == []
