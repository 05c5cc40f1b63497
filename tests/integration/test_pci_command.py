"""`crs pci scan` (server/cli/pci.py) on the real stack: a card number written into a clear column
around the service's checks is found and named by table, column and row key, never shown; the
scan reads every table of the schema."""

from __future__ import annotations

import uuid

from devstack.environment import DevEnvironment
from server.proto import crs_pb2 as pb
from tests.integration.support import Clients, UsedSecrets, crs_command, fresh_pan, sql


def _scan(env: DevEnvironment) -> tuple[int, set[str], str]:
    r = crs_command(env, "pci", "scan", "--limit", "100000")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, set(r.stdout.splitlines()), r.stderr


def test_a_card_number_kept_in_clear_is_found_and_never_shown(dev_env: DevEnvironment, node_a: Clients,
                                                              used_secrets: UsedSecrets) -> None:
    pan = fresh_pan(used_secrets)
    customer = node_a.admin.CreateCustomer(pb.CreateCustomerRequest(
        request_id=uuid.uuid4().hex, display_name="Scan Me"), timeout=5)
    dsn = dev_env.settings().pg_dsn
    _, before, _ = _scan(dev_env)
    # As data written before the checks were: in a name, grouped as on the card, next to other text.
    grouped = " ".join(pan[i:i + 4] for i in range(0, len(pan), 4))
    sql(dsn, "UPDATE customers SET display_name = $2 WHERE customer_id = $1", customer.customer_id,
        f"Scan Me (card {grouped})")
    try:
        code, found, err = _scan(dev_env)
        assert code == 1, err
        assert found - before == {f"customers.display_name  customer_id={customer.customer_id}"}, found - before
        assert "look like a card number" in err and "rows read" in err
        shown = "\n".join(found) + err
        assert pan not in shown and grouped not in shown and pan[6:12] not in shown
    finally:
        sql(dsn, "UPDATE customers SET display_name = 'Scan Me' WHERE customer_id = $1", customer.customer_id)
    code, after, _ = _scan(dev_env)
    assert after == before and (code == 1) == bool(before)


def test_a_key_holding_a_card_number_is_masked_in_the_finding(dev_env: DevEnvironment,
                                                              used_secrets: UsedSecrets) -> None:
    """A source reference was a card number (the import refuses that now): the row's key is the
    finding's only way to name the row, and it is shown with its digits masked."""
    pan = fresh_pan(used_secrets)
    dsn = dev_env.settings().pg_dsn
    request_id = f"scan-{pan}"    # an idempotency row's key, as a client could have sent it
    sql(dsn, "INSERT INTO idempotency (request_id, rpc, response) VALUES ($1, 'Test', ''::bytea)", request_id)
    try:
        code, found, _ = _scan(dev_env)
        assert code == 1
        mine = [line for line in found if line.startswith("idempotency.request_id  ")]
        assert mine and all(pan not in line for line in found), mine
    finally:
        sql(dsn, "DELETE FROM idempotency WHERE request_id = $1", request_id)


def test_a_negative_limit_is_bad_usage(dev_env: DevEnvironment) -> None:
    """--limit -1 printed every finding but the last, then "... and N+1 more (--limit)": with nothing
    found, "... and 1 more", a finding that was not there, and exit 0 beside it."""
    r = crs_command(dev_env, "pci", "scan", "--limit", "-1")
    assert r.returncode == 2 and "--limit" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "more" not in r.stdout, r.stdout
