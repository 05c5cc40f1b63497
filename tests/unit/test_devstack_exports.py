"""The `export ...` lines `crs-dev up` prints can be pasted into a shell: with replicas the shard list
holds `|` (unquoted, the line became a pipeline and exported nothing), a weight `;`, the DSN `?`. Each
line is run as `bash -c 'eval "$LINE"; env -0'` and must set every variable to exactly its value."""

from __future__ import annotations

import os
import subprocess

from devstack.cli import export_line, operator_exports
from devstack.environment import dev_keys
from shard_router.addresses import ShardAddress, format_shards, parse_shards

DSN = ("postgresql://crs_sre:p%40ss@127.0.0.1:46001/crs?target_session_attrs=prefer-standby"
       "&host=/tmp/pg run")
SHARDS = (ShardAddress("shard-0", "redis://127.0.0.1:46295/0", replicas=("redis://127.0.0.1:48013/0",)),
          ShardAddress("shard-1", "redis://127.0.0.1:58673/0", weight=2,
                       replicas=("redis://127.0.0.1:58674/0", "redis://127.0.0.1:58675/0")))


def _exported(line: str) -> dict[str, str]:
    """What a shell that evaluates `line` then has in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRS_")} | {"LINE": line}
    out = subprocess.run(["bash", "-c", 'eval "$LINE"; env -0'], env=env, capture_output=True, check=True).stdout
    found = dict(item.split("=", 1) for item in out.decode().split("\0") if item)
    return {k: v for k, v in found.items() if k.startswith("CRS_")}


def test_the_printed_lines_set_every_variable_exactly() -> None:
    keys = dev_keys()
    sre, bulk = operator_exports(DSN, SHARDS, keys)
    expected = {"CRS_PG_DSN": DSN, "CRS_REDIS_SHARDS": format_shards(SHARDS)}
    assert "|" in expected["CRS_REDIS_SHARDS"] and ";" in expected["CRS_REDIS_SHARDS"]
    assert _exported(sre) == expected
    assert _exported(bulk) == expected | keys
    assert parse_shards(_exported(sre)["CRS_REDIS_SHARDS"]) == SHARDS


def test_any_value_survives_the_shell() -> None:
    nasty = {"CRS_A": "a|b;c&d", "CRS_B": "it's $HOME `id` \"q\" *?[x]", "CRS_C": "", "CRS_D": "two\nlines \\ end"}
    assert _exported(export_line(nasty)) == nasty
