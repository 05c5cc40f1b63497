"""`python -m loadtests.sweep.probe`: how much CPU a fixed piece of Python work costs on this machine, now.

A control for the sweep on a shared machine. CPU-seconds per lookup can rise for two reasons: the
service does more work per lookup, or the same work costs more CPU because the machine is crowded
(other processes evict ours from the caches, more context switches). The probe does the same small
interpreter-bound job (dicts, strings, a hash: like a lookup's parsing and encoding) a few times a
second at a low duty cycle and writes, each second, the median thread CPU time per job. Run it beside
a sweep and compare the seconds of each run's window: if the probe's cost rises with the sweep's size
as much as the service's does, the machine, not the service, is the cause.

    python -m loadtests.sweep.probe --seconds 600 --out /tmp/probe.jsonl &
    python -m loadtests.sweep --nodes 1,8 --shards 1,8 --rounds 2 ... --artifacts /tmp/art

    python -m loadtests.sweep.probe --compare /tmp/probe.jsonl --report /tmp/out/sweep.json

Every line: {"t": unix seconds, "jobs": n, "cpu_us_median": ...}. It stops by itself after --seconds.
--compare prints, for each sweep run of a report, its node CPU per lookup and the probe's median cost
in that run's window, each as a ratio to the series' smallest size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadtests.sweep.report import RunResult

JOB_ITEMS = 200          # one job: about a millisecond of CPU on the 2-core VM
JOBS_PER_SECOND = 20     # ~2 % of a core: the probe must not be the crowd it measures


def job() -> int:
    """Fixed interpreter work: build, encode and hash a few hundred small records."""
    acc = 0
    for i in range(JOB_ITEMS):
        record = {"pan": f"4000{i:012d}", "status": "ACTIVE", "n": i, "name": "probe" * 3}
        text = json.dumps(record, sort_keys=True)
        acc ^= int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return acc


def compare(probe_path: str, report_path: str) -> str:
    """Each sweep run's node CPU per lookup and the probe's median cost in its window, as ratios to the
    smallest size of the same series and round."""
    from loadtests.sweep.report import by_series, runs_from_report

    with open(probe_path) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    with open(report_path) as f:
        report = json.load(f)

    def probe_in(r: RunResult) -> float:
        inside = [x["cpu_us_median"] for x in samples if r.started_at <= x["t"] < r.started_at + r.wall_s]
        return statistics.median(inside) if inside else math.nan

    lines = []
    for name, runs in by_series(runs_from_report(report)).items():
        for round_no in sorted({r.round for r in runs}):
            rs = sorted((r for r in runs if r.round == round_no), key=lambda r: (r.nodes, r.shards))
            base_cpu, base_probe = rs[0].node_cpu_per_1k, probe_in(rs[0])
            for r in rs:
                lines.append(f"{name} round {round_no}: {r.nodes} node(s) {r.shards} shard(s): node CPU "
                             f"{r.node_cpu_per_1k:.3f} CPU-s/1k ({r.node_cpu_per_1k / base_cpu:.2f}x), probe "
                             f"{probe_in(r):.0f} us/job ({probe_in(r) / base_probe:.2f}x)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.sweep.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0, help="stop after this long (default 300)")
    p.add_argument("--out", default="-", help="JSON lines file (default: stdout)")
    p.add_argument("--compare", default="", help="a probe's JSON lines file: compare it with --report, run nothing")
    p.add_argument("--report", default="", help="the sweep.json to compare with")
    args = p.parse_args(argv)
    if args.compare:
        print(compare(args.compare, args.report))
        return 0
    out = sys.stdout if args.out == "-" else open(args.out, "a")
    end = time.monotonic() + args.seconds
    try:
        while time.monotonic() < end:
            second = int(time.time())
            costs = []
            while int(time.time()) == second and time.monotonic() < end:
                c0 = time.thread_time_ns()
                job()
                costs.append((time.thread_time_ns() - c0) / 1000)
                time.sleep(1 / JOBS_PER_SECOND)
            if costs:
                out.write(json.dumps({"t": second, "jobs": len(costs),
                                      "cpu_us_median": round(statistics.median(costs), 1)}) + "\n")
                out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
