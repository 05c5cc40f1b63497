"""Regenerate server/proto/crs_pb2.py(+.pyi) from protos/ with grpcio-tools.

Run: python -m scripts.gen_protos   (tests/unit/test_generated_code.py checks the result is current)
Only the message module is generated; service stubs come from the descriptors (server/rpc.py), so the
generated file imports nothing of ours and can live inside the server package.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "crs/v1/crs.proto"
OUT = ROOT / "server" / "proto"


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"   # google/protobuf/timestamp.proto
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{well_known}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", PROTO])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        written = []
        for name in ("crs_pb2.py", "crs_pb2.pyi"):
            target = out_dir / name
            shutil.copyfile(Path(tmp) / "crs" / "v1" / name, target)
            written.append(target)
        return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
