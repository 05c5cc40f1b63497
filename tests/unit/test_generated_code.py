"""server/proto/crs_pb2.py(+.pyi) is exactly what grpcio-tools makes of protos/ (never edited by hand)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.gen_protos import OUT, generate


def test_generated_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    for fresh in generate(tmp_path):
        committed = OUT / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run `python -m scripts.gen_protos` and commit the result")
