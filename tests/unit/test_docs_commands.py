"""Every `crs`, `crs-dev` and `crs-load` command the README, docs/ and the runbooks show exists, with
the flags it is shown with (an outside check found a runbook's `crs audit --since 10m`: the flag is
`--hours`). Checked against the real parsers, not their --help text."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

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


# --------------------------------------------------------------------------------------------------
# Every command line, parsed whole by the real parser (types, choices, required arguments, runners)
# --------------------------------------------------------------------------------------------------

SHELL_FENCES = {"", "sh", "bash", "shell", "console"}
# How a command is written in front of the program: a prompt, VAR=value, `kubectl ... exec ... --`.
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
ANGLE_PLACEHOLDER = re.compile(r"<[^<>()\s][^<>()]*>")      # <pod>, <previous version>; not <(...)
UPPER = re.compile(r"[A-Z]")
# argparse's "missing" errors: an inline `crs shards mark` names a command, it is not a command line.
FRAGMENT_ERRORS = ("the following arguments are required", "expected one argument")
# Command lines shown on purpose as refused (the audit log quotes what it tested), or shorthand.
NOT_COMMAND_LINES = {
    ("docs/audit-2026-12-04.md", "crs lookup/feed/identity"): "shorthand for three commands",
    ("docs/audit-2026-12-04.md", "crs-load capacity --miss-ratio 2"): "a value the audit made it refuse",
    ("docs/audit-2026-12-04.md", "crs keys rotate-fingerprint --batch 0"): "a value the audit made it refuse",
    ("docs/audit-2026-12-04.md", "crs shards history --limit -1"): "a value the audit made it refuse",
    ("docs/audit-2026-12-04.md", "crs pci scan --limit -1"): "a value the audit made it refuse",
}


class _Parsed(Exception):
    """Raised by a runner's parser once it parsed its arguments: nothing after parsing runs."""


def _placeholder(token: str) -> bool:
    """DIR, N, OUT.csv, shard-N, "$PKI", "$(jq ...)", <pod>: a value the reader fills in."""
    return bool(UPPER.search(token)) or "$" in token or "..." in token or "…" in token


def _shell_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, command text, whole): fenced shell lines (`\\` continuations joined; in a console
    block only `$ ` lines) are whole commands; inline code spans (across line breaks) may be fragments."""
    out: list[tuple[int, str, bool]] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None
    para: list[tuple[int, str]] = []

    def spans() -> None:
        joined, starts = "", []
        for n, line in para:
            starts.append((len(joined), n))
            joined += line + "\n"
        for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)*)`", joined):
            out.append((max(n for off, n in starts if off <= m.start()), m.group(1).replace("\n", " "), False))
        para.clear()

    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            spans()
            fence = None if fence is not None else stripped[3:].strip().lower()
            continue
        if fence is None:
            para.append((n, line))
            if not stripped:
                spans()
            continue
        if fence not in SHELL_FENCES:
            continue
        if pending is not None:
            start, head = pending
            joined = head + " " + stripped.removesuffix("\\")
            pending = (start, joined) if stripped.endswith("\\") else None
            if pending is None:
                out.append((start, joined, True))
            continue
        if fence == "console":
            if not stripped.startswith("$ "):
                continue
            stripped = stripped[2:]
        if stripped.endswith("\\"):
            pending = (n, stripped.removesuffix("\\"))
        else:
            out.append((n, stripped, True))
    spans()
    return out


def _segments(command: str) -> list[list[str]]:
    """The simple commands of a line: split at pipes, `&&`, `;` and redirections."""
    # `(` and `)` stay in words: "(crs-load capacity)" in a file tree is no command.
    lex = shlex.shlex(ANGLE_PLACEHOLDER.sub("PLACEHOLDER", command), posix=True, punctuation_chars="|&;<>")
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:          # a quote opened in the span and closed outside it: not a command line
        return []
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token and set(token) <= set("|&;<>"):
            if segments[-1] and segments[-1][-1].isdigit() and token.startswith(">"):
                segments[-1].pop()              # 2>&1, 2>/dev/null
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def _invocation(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(program, argv) of a segment that runs one of ours, else None."""
    t = list(tokens)
    while t and (t[0] == "$" or ENV_ASSIGNMENT.match(t[0])):
        t.pop(0)
    if t and t[0] == "kubectl":
        if "--" not in t:
            return None
        t = t[t.index("--") + 1:]
    if not t:
        return None
    if any(w.endswith(":") for w in t[:3]):
        return None             # `crs import: interrupted after row N`: a message the command prints
    program = t[0].removeprefix(".venv/bin/")
    if program == "./crsw" and len(t) > 1:
        aliases = {"dev": ("crs-dev", ["up"]), "bench": ("loadtests.bench", [])}
        if t[1] in aliases:
            return aliases[t[1]][0], [*aliases[t[1]][1], *t[2:]]
        program, t = t[1], t[1:]
    if program in ("python", "python3") and t[1:2] == ["-m"] and len(t) > 2:
        return (t[2], t[3:]) if t[2] in ("loadtests.sweep", "loadtests.bench") else None
    return (program, t[1:]) if program in PARSERS else None


def _parse(program: str, argv: list[str]) -> str | None:
    """argparse's complaint about argv, or None. Parses only: nothing runs."""
    from loadtests.bench.run import parse_args as bench
    from loadtests.sweep.run import parse_args as sweep

    runners: dict[str, Callable[[list[str]], object]] = {"sweep": sweep, "bench": bench}
    parse: Callable[[list[str]], object]
    if program == "crs-load" and argv and argv[0] in RUNNERS:
        name = argv.pop(0)
        parse = runners.get(name) or _runner_parse(RUNNERS[name][0])
    elif program.startswith("loadtests."):
        parse = runners[program.removeprefix("loadtests.")]
    else:
        parse = PARSERS[program].parse_args
    err = io.StringIO()
    # No abbreviations: `--checkpoint` for `--checkpoints` parses, but the doc should spell the flag.
    abbreviations = argparse.ArgumentParser._get_option_tuples
    argparse.ArgumentParser._get_option_tuples = lambda self, option_string: []  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except _Parsed:
        return None
    except SystemExit as e:
        return None if e.code in (0, None) else (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
    finally:
        argparse.ArgumentParser._get_option_tuples = abbreviations  # type: ignore[method-assign]
    return None


def _runner_parse(main: Callable[[Sequence[str]], int]) -> Callable[[list[str]], None]:
    """A runner whose parser lives inside its main(): run main with parse_args stopping right after."""
    def parse(argv: list[str]) -> None:
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
            original(self, *args, **kwargs)
            raise _Parsed
        argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
        try:
            main(argv)
        finally:
            argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
        raise AssertionError("the runner returned without parsing its arguments")
    return parse


def _synopsis(argv: list[str]) -> list[str]:
    """`[--format jsonl|csv]` and `status|plan` in a synopsis: the brackets dropped, the first choice."""
    return [word.strip("[]").split("|")[0] for word in argv if word.strip("[]")]


# Values tried in place of a placeholder that a type refuses (`--from N`, `add-replica shard-N NEW-ADDRESS`),
# so that the rest of the line is still checked.
FILL_INS = ("1", "redis://placeholder:6379/0", "placeholder")


def _parse_filled_in(program: str, argv: list[str]) -> str | None:
    """_parse's complaint, after filling in placeholders its types refuse; None when only a placeholder
    was refused with every fill-in (a choice: `crs shards mark shard-N STATE`)."""
    def quoted(problem: str | None) -> list[str]:
        return re.findall(r"'([^']*)'", problem.split(":", 1)[-1]) if problem else []

    argv = list(argv)
    for _ in range(len(argv) + 1):
        problem = _parse(program, list(argv))
        refused = [q for q in quoted(problem) if _placeholder(q)]
        if problem is None or not refused or refused[0] not in argv:
            return None if problem is None or refused else problem
        at = argv.index(refused[0])
        for value in FILL_INS:
            if not {refused[0], value} & set(quoted(_parse(program, [*argv[:at], value, *argv[at + 1:]]))):
                argv[at] = value
                break
        else:
            return None         # nothing fits: a choice left to the reader
    return None


def command_line_problems_in(text: str, where: str) -> list[str]:
    found = []
    for lineno, command, whole in _shell_lines(text):
        for segment in _segments(command):
            invocation = _invocation(segment)
            if invocation is None:
                continue
            program, argv = invocation
            cut = next((i for i, w in enumerate(argv) if w in ("...", "…")), None)
            argv = _synopsis(argv[:cut])
            problem = _parse_filled_in(program, argv)
            if problem is None or (where, " ".join(segment)) in NOT_COMMAND_LINES:
                continue
            if (not whole or cut is not None) and any(e in problem for e in FRAGMENT_ERRORS):
                continue
            found.append(f"{where}:{lineno}: `{' '.join(segment)}`: {problem}")
    return found


def test_the_command_line_checker_finds_what_it_should() -> None:
    doc = ("Run `crs audit --hours 2h` or `crs shards mark` (a name).\n\n"
           "```sh\n./crsw crs shards add shard-4 --address redis://r:6379/0 --weight 2 \\\n  --wait\n"
           "crs shards mark shard-N down && crs shards plan --sample many   # comment --nothing\n"
           "crs bins activate <previous version>; crs feed tail --from N --epoch E 2>&1 | head\n"
           "crs feed tail --from N --nofollow\n"
           "kubectl -n crs exec deploy/crs-node -- crs shards status --yaml\n"
           "python -m loadtests.sweep --nodes 1,2 --node-mode threads\n"
           "crs-load identity-bench --customers many\n"
           "crs-load identity-bench --checkpoint 10\n```\n\n"
           "```console\n$ crs identity reviews --status closed\nrev_1  open  --not-a-command\n```\n"
           "A tree:\n```\nsweep/  the model (crs-load capacity)\n```\nIt prints `crs import: interrupted`.\n")
    found = [(f.split(":")[1], f.split("`: ", 1)[1]) for f in command_line_problems_in(doc, "x")]
    # (line, the message's start: Python 3.12.8+ lists the choices without quotes)
    expected = [
        ("1", "crs audit: error: argument --hours: invalid float value: '2h'"),
        ("4", "crs: error: unrecognized arguments: --wait"),
        ("6", "crs shards plan: error: argument --sample: invalid int value: 'many'"),
        ("8", "crs: error: unrecognized arguments: --nofollow"),
        ("9", "crs: error: unrecognized arguments: --yaml"),
        ("10", "python -m loadtests.sweep: error: argument --node-mode: invalid choice: 'threads'"),
        ("11", "crs-load identity-bench: error: argument --customers: invalid int value: 'many'"),
        ("12", "crs-load identity-bench: error: unrecognized arguments: --checkpoint 10"),
        ("16", "crs identity reviews: error: argument --status: invalid choice: 'closed'"),
    ]
    assert len(found) == len(expected), found
    assert [(n, m[:len(e)]) for (n, m), (_, e) in zip(found, expected, strict=True)] == expected, found


def test_every_documented_command_line_parses() -> None:
    """Each command line of a shell or console block, and each inline `crs ...` span, parses with the
    real parser: value types and choices, required arguments (code blocks), the runners' own parsers
    (crs-load sweep/bench/identity-bench/identity-import, python -m loadtests.sweep/bench)."""
    found = [p for doc in _documents() for p in command_line_problems_in(doc.read_text(), str(doc.relative_to(ROOT)))]
    assert found == []


LOCUSTFILE = ROOT / "loadtests" / "scenarios" / "locustfile.py"


def test_documented_locust_options_exist() -> None:
    """`--crs-*` options shown in the docs are the locustfile's (locust itself is not imported here)."""
    known = set(re.findall(r"add_argument\(\s*\"(--crs-[a-z-]+)\"", LOCUSTFILE.read_text()))
    assert len(known) >= 10
    shown = {(str(doc.relative_to(ROOT)), flag) for doc in _documents()
             for flag in re.findall(r"(?<![\w-])--crs-[a-z]+(?:-[a-z]+)*(?![\w-])", doc.read_text())}
    assert sorted((d, f) for d, f in shown if f not in known) == []


# A dashboard panel a runbook sends the reader to: `Dashboard → "Feed watchers", "waiting for ..."`,
# `the dashboard's "Caller errors/s ..." panel`. At 3 a.m. the reader searches the dashboard for it.
DASHBOARD = ROOT / "k8s" / "monitoring" / "crs-dashboard.json"
PANEL_NAMES = re.compile(r"[Dd]ashboard(?:'s)?(?: \*[^*]+\*)? (?:→ )?((?:\"[^\"]+\"(?:,? (?:and )?|, )?)+)")


def _dashboard_names() -> tuple[set[str], list[str]]:
    """Panel and row titles, and the series' legends (a legend names a line within a panel)."""
    def panels(ps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [q for p in ps for q in (p, *panels(p.get("panels", [])))]
    board = json.loads(DASHBOARD.read_text())
    every = panels(board["panels"])
    return ({p["title"] for p in every if p.get("title")},
            [t.get("legendFormat", "") for p in every for t in p.get("targets", [])])


def test_dashboard_panels_the_docs_name_exist() -> None:
    titles, legends = _dashboard_names()
    assert "Feed watchers" in titles and len(titles) >= 20
    found, named = [], 0
    for doc in _documents():
        text = " ".join(doc.read_text().split())
        for m in PANEL_NAMES.finditer(text):
            for name in re.findall(r"\"([^\"]+)\"", m.group(1)):
                named += 1
                if name not in titles and not any(name in legend for legend in legends):
                    found.append(f"{doc.relative_to(ROOT)}: dashboard panel \"{name}\" is not the dashboard's")
    assert named >= 10
    assert found == []
