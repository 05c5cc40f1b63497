"""What the load tests share (loadtests/shared/): report arithmetic, the node's tier counters read from
/metrics with prometheus_client's parser, and process-tree CPU time and pinning through psutil."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loadtests.shared import procs
from loadtests.shared.arith import json_safe, safe_div
from loadtests.shared.metrics import scrape_tiers, tiers_in
from server.metrics import Metrics


# -- arithmetic --------------------------------------------------------------------------------------
def test_safe_div_is_nan_without_a_positive_divisor() -> None:
    assert safe_div(6, 3) == 2
    for b in (0, 0.0, -1.0, math.nan):
        assert math.isnan(safe_div(1, b))


def test_json_safe_replaces_nan_and_inf_at_any_depth() -> None:
    doc = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, math.nan), "e": "x"}
    assert json_safe(doc) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, None], "e": "x"}
    json.dumps(json_safe(doc), allow_nan=False)   # standard JSON


# -- tier counters -----------------------------------------------------------------------------------
def _page(**tiers: int) -> bytes:
    """A node's /metrics page as the server renders it, with these crs_lookups_total counts."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for tier, n in tiers.items():
        for _ in range(n):
            metrics.tier_hit(tier)
    metrics.observe_rpc("ResolveCard", "OK", 0.001)   # other families, with labels of their own
    metrics.flush()
    return generate_latest(registry)


def test_tiers_from_the_servers_own_exposition() -> None:
    assert tiers_in(_page(l1=5, l2=2, l3=1).decode()) == {"l1": 5.0, "l2": 2.0, "l3": 1.0}
    assert tiers_in(_page().decode()) == {}


@pytest.fixture()
def pages() -> Iterator[list[str]]:
    bodies = {"/a": _page(l1=3, l3=1), "/b": _page(l1=4, coalesced=2)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield [f"{base}/a", f"{base}/b", f"{base}/missing"]
    finally:
        server.shutdown()
        server.server_close()


def test_scrape_sums_the_nodes_and_skips_pages_it_cannot_fetch(pages: list[str]) -> None:
    assert scrape_tiers(pages, timeout=2) == {"l1": 7.0, "l3": 1.0, "coalesced": 2.0}
    assert scrape_tiers(pages[:1], timeout=2) == {"l1": 3.0, "l3": 1.0}
    assert scrape_tiers([]) == {}


# -- processes ---------------------------------------------------------------------------------------
BURNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
print(child.pid, flush=True)
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("burnt", flush=True)
sys.stdin.read()
child.kill()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_cpu_time_and_pinning_cover_the_whole_tree() -> None:
    parent = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None and parent.stdin is not None
    try:
        child = int(parent.stdout.readline())
        before = procs.cpu_snapshot([parent.pid])
        assert set(before) == {parent.pid, child}
        assert parent.stdout.readline().strip() == "burnt"
        after = procs.cpu_snapshot([parent.pid])
        assert procs.cpu_delta(before, after) >= 0.2
        assert procs.cpu_delta(before, {**after, 99999999: 0.5}) >= 0.7   # a new process counts from zero
        cpu = min(os.sched_getaffinity(0))
        assert procs.pin([parent.pid, child], [cpu]) >= 2   # each process once, every thread
        assert os.sched_getaffinity(parent.pid) == os.sched_getaffinity(child) == {cpu}
    finally:
        parent.stdin.close()
        parent.wait(10)
    assert procs.cpu_seconds_of(parent.pid) is None
    assert procs.cpu_snapshot([parent.pid]) == {}
    assert procs.pin([parent.pid], [0]) == 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="Linux, 2 CPUs")
def test_pin_self_leaves_the_processes_it_started_where_they_were_pinned() -> None:
    """A bench pins its servers to one CPU and itself to another: pin_self pinned its children too, so the
    servers ran on the bench's own CPU (server_model.py, thread_pool.py, catch_up_storm --split-cpus)."""
    mine = os.sched_getaffinity(0)
    server_cpu, own_cpu = sorted(mine)[:2]
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        procs.pin([child.pid], [server_cpu])
        procs.pin_self({own_cpu})
        assert os.sched_getaffinity(0) == {own_cpu}
        assert os.sched_getaffinity(child.pid) == {server_cpu}
    finally:
        procs.pin_self(mine)
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


def test_paused_stops_the_whole_tree_for_the_block_and_resumes_it_even_on_an_error() -> None:
    """The benchmark stops the servers it is not measuring (their idle wake-ups shared the server core)."""
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                               "print(c.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    try:
        child = int(parent.stdout.readline())
        tree = [psutil.Process(parent.pid), psutil.Process(child)]
        with pytest.raises(RuntimeError), procs.paused([parent.pid, 99999999]) as stopped:
            assert stopped == 2
            deadline = time.monotonic() + 5     # a signal takes effect asynchronously
            while [p.status() for p in tree] != [psutil.STATUS_STOPPED] * 2:
                assert time.monotonic() < deadline, [p.status() for p in tree]
                time.sleep(0.01)
            raise RuntimeError("the phase failed")
        deadline = time.monotonic() + 5
        while psutil.STATUS_STOPPED in [p.status() for p in tree]:
            assert time.monotonic() < deadline, "still stopped after the block"
            time.sleep(0.01)
    finally:
        parent.kill()
        parent.wait(10)
        psutil.Process(child).kill()


@pytest.mark.skipif(not procs.schedstat_available(), reason="no /proc/PID/task/TID/schedstat")
def test_runtime_snapshot_agrees_with_process_times_at_finer_resolution() -> None:
    parent = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None and parent.stdin is not None
    try:
        child = int(parent.stdout.readline())
        before, ticks_before = procs.runtime_snapshot([parent.pid]), procs.cpu_snapshot([parent.pid])
        assert {parent.pid, child} <= set(before)          # keyed by thread id: main threads are the pids
        assert parent.stdout.readline().strip() == "burnt"
        after, ticks_after = procs.runtime_snapshot([parent.pid]), procs.cpu_snapshot([parent.pid])
        burnt = procs.cpu_delta(before, after)
        assert burnt >= 0.25
        assert burnt == pytest.approx(procs.cpu_delta(ticks_before, ticks_after), abs=0.05)
        assert any(v != round(v, 2) for v in after.values())   # finer than the 10 ms of clock ticks
    finally:
        parent.stdin.close()
        parent.wait(10)
    assert procs.runtime_snapshot([parent.pid]) == {}


def test_cpu_seconds_of_this_process_is_its_process_time() -> None:
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    mine = procs.cpu_seconds_of(os.getpid())
    assert mine is not None and mine == pytest.approx(time.process_time(), abs=0.05)


# -- machine -----------------------------------------------------------------------------------------
def test_machine_description() -> None:
    from loadtests.shared.machine import cpu_model, git_commit, kernel, utc_now

    assert utc_now().endswith(" UTC") and cpu_model() and kernel()
    head = git_commit()
    assert head == "unknown" or all(c in "0123456789abcdef" for c in head)
    assert git_commit(mark_dirty=True).startswith(head)
