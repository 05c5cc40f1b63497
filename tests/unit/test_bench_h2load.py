"""The benchmark's h2load client (loadtests/bench/loadgen.py, `crsw bench --client h2load`): the gRPC
frame it posts, how its per-request log is read, which phases keep the aio client, and one short run
against a real sync echo server where nghttp2's h2load is installed (an optional tool: Debian's
nghttp2-client; skipped elsewhere)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loadtests.bench import loadgen, run
from server.proto import crs_pb2 as pb


def test_a_grpc_frame_is_uncompressed_length_prefixed() -> None:
    message = pb.ResolveCardRequest(pan="4" * 16).SerializeToString()
    frame = loadgen.grpc_frame(message)
    assert frame[0] == 0 and int.from_bytes(frame[1:5], "big") == len(message) == len(frame) - 5
    assert pb.ResolveCardRequest.FromString(frame[5:]).pan == "4" * 16
    assert loadgen.grpc_frame(b"") == b"\0\0\0\0\0"


def test_the_log_is_read_within_the_window_and_non_200_are_refused(tmp_path: Path) -> None:
    log = tmp_path / "h2load.tsv"
    # start (us since the epoch), HTTP status, time taken (us): before, in (3: one refused), after.
    log.write_text("999999\t200\t50\n1000000\t200\t250\n1500000\t503\t40\n1999999\t200\t1000\n2000000\t200\t70\n")
    latencies, refused = loadgen._h2load_log(log, 1.0, 2.0)
    assert latencies == [0.00025, 0.001] and refused == 1
    everything, refused = loadgen._h2load_log(log)
    assert (len(everything), refused) == (4, 1)


def test_mutual_tls_postgresql_and_paced_phases_keep_the_aio_client() -> None:
    args = run.parse_args(["--client", "h2load", "--no-write"])
    by_key = {p.key: p for p in run.PHASES}
    clients = {key: run.phase_spec(by_key[key], args, window=1.0, cpus=None, hot=[1], cards=10).get("client")
               for key in ("echo_sync", "l1_hybrid", "l2", "l1_mtls_hybrid", "l1_half_hybrid", "echo_half", "l3")}
    assert clients == {"echo_sync": "h2load", "l1_hybrid": "h2load", "l2": "h2load", "l1_mtls_hybrid": "aio",
                       "l1_half_hybrid": "aio", "echo_half": "aio", "l3": "aio"}


@pytest.mark.skipif(shutil.which("h2load") is None, reason="nghttp2's h2load is not installed (optional tool)")
def test_a_short_run_against_a_sync_echo_server(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(pb.Resolution(card=pb.Card(last4="0000")).SerializeToString())
    echo = run.EchoServer(payload, tmp_path / "echo.log", sync=True)
    try:
        result = loadgen.unary_h2load({"target": f"127.0.0.1:{echo.port}", "keys": [1], "channels": 2,
                                       "concurrency": 8, "seconds": 1.0, "warmup": 0.3, "idle_seconds": 0.3,
                                       "server_pids": [echo.proc.pid]})
    finally:
        echo.stop()
    assert result["calls"] == result["items"] > 100 and result["errors"] == 0, result["error_sample"]
    assert len(result["latency_s"]) == result["calls"] and result["idle_latency_s"]
    assert result["server_cpu_s"] > 0 and result["client_cpu_s"] > 0
