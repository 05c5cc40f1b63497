"""PCI: no clear PAN or account number anywhere — every PostgreSQL table, every Redis key and value on
every shard, the node and server logs (PostgreSQL's when the suite started it), the metrics output.
Identity PII likewise: no clear national id or date of birth. Runs last (file name) over everything
the session's tests sent."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import ahocorasick
import asyncpg
import redis

from devstack.demo import demo_account_number, demo_pan
from devstack.environment import DevEnvironment
from tests.integration.support import Clients, UsedSecrets, crs_command, node_logs


async def _dump_tables(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")]
        dumps = {}
        for table in tables:
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{table}" t')
            dumps[table] = "\n".join(r["row"] for r in rows)
        return dumps
    finally:
        await conn.close()


class Needles:
    """Every clear value as text and as the hex PostgreSQL uses to print bytea, found in one pass
    over a text however many there are (Aho-Corasick: thousands of needles times megabytes of
    table dumps took minutes with one substring search per needle)."""

    def __init__(self, secrets: set[str]) -> None:
        self.automaton = ahocorasick.Automaton()
        for s in secrets:
            for form in (s, s.encode().hex()):
                self.automaton.add_word(form, form)
        self.automaton.make_automaton()

    def found(self, data: str | bytes) -> set[str]:
        text = data.decode("latin-1") if isinstance(data, bytes) else data   # needles are ASCII
        return {needle for _, needle in self.automaton.iter(text)}

    def found_whole(self, text: str) -> set[str]:
        """Needles standing alone as numbers: neither a digit nor a '.' before, no digit after (demo
        account 700000000000 is also inside float samples such as 0.47000000000000003)."""
        return {needle for end, needle in self.automaton.iter(text)
                if not _part_of_a_number(text, end - len(needle), end + 1)}


def _part_of_a_number(text: str, start: int, after: int) -> bool:
    return (start > 0 and text[start - 1] in "0123456789.") or (after < len(text) and text[after].isdigit())


def test_no_clear_pan_or_account_number_anywhere(dev_env: DevEnvironment, node_a: Clients, node_b: Clients,
                                                 used_secrets: UsedSecrets) -> None:
    # Everything the suite sent: the PANs and account numbers tests made, and demo keys they used.
    secrets = set(used_secrets.pans) | set(used_secrets.account_numbers)
    secrets |= {demo_pan(i) for i in range(600)} | {demo_account_number(i) for i in range(450)}
    assert len(used_secrets.pans) >= 5, "the scan needs the PANs the other tests created"
    assert len(used_secrets.identity) >= 3, "the scan needs the national ids and birth dates tests sent"
    secrets |= used_secrets.identity
    needles = Needles(secrets)

    dumps = asyncio.run(_dump_tables(dev_env.settings().pg_dsn))
    assert {"cards", "accounts", "outbox", "idempotency", "customers"} <= set(dumps)
    assert sum(len(d) for d in dumps.values()) > 10_000
    for table, text in dumps.items():
        assert not needles.found(text), f"clear card/account number or identity PII in table {table}"
    # And nothing else that looks like a card number, whoever wrote it (server/cli/pci.py).
    scan = crs_command(dev_env, "pci", "scan")
    assert scan.returncode == 0, scan.stdout + scan.stderr

    values_seen = 0
    for name, url in dev_env.shard_urls().items():
        client = redis.Redis.from_url(url)
        entries = []
        for key in client.scan_iter(count=1000):
            entries.append(key + b"\x00" + (client.get(key) or b""))
        values_seen += len(entries)
        # One blob per shard, each needle searched once (per key and needle took minutes).
        blob = b"\x01".join(entries)
        leaked = needles.found(blob)
        assert not leaked, f"clear number in Redis {name} key(s) " + ", ".join(
            repr(e.partition(b"\x00")[0]) for e in entries if needles.found(e))
    assert values_seen > 100

    logs = node_logs(dev_env)
    if dev_env.stack is not None:   # an external PostgreSQL's log is not ours to read
        logs += Path(dev_env.stack.postgres.log_path).read_text(errors="replace")
    assert not needles.found(logs) & secrets, "a clear card/account number or identity PII was logged"
    for clients in (node_a, node_b):
        url = f"http://127.0.0.1:{clients.node.settings.metrics_port}/metrics"
        metrics = urllib.request.urlopen(url, timeout=5).read().decode()
        # One pass, as above: a regular expression per needle took a minute over ~20k needles.
        assert not needles.found_whole(metrics) & secrets, "a clear number in the metrics output"
