"""`python -m loadtests.scenarios.stack`: the embedded stack (devstack/environment.py) for a load test, as a
child process.

Starts PostgreSQL + Redis shards, loads the demo data, starts one `crs serve` with --workers node
processes on 127.0.0.1, prints one line `READY {"address": ..., "metrics": ..., ...}` and runs until
its parent exits or it gets SIGTERM/SIGINT, then stops everything.
The locustfile's --crs-embedded uses it, so the load generator's gevent world never shares a
process with asyncio/asyncpg.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.scenarios.stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=2000, help="demo customers (default 2000)")
    p.add_argument("--shards", type=int, default=2, help="Redis shards (default 2)")
    p.add_argument("--workers", type=int, default=1, help="node processes (default 1)")
    p.add_argument("--tls", action="store_true",
                   help="serve mutual TLS with a generated dev PKI (as `crs-dev up` does); READY then names the CA "
                        "and the 'admin' client certificate and key")
    p.add_argument("--pg-binaries", default="auto", choices=("auto", "system", "pgserver"))
    args = p.parse_args(argv)
    if args.customers < 1 or args.shards < 1 or args.workers < 1:
        p.error("--customers, --shards and --workers must be >= 1")

    from devstack.environment import DevEnvironment
    from server.logs import configure_logging

    configure_logging("WARNING")
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    parent = os.getppid()
    env = DevEnvironment(shards=args.shards, customers=args.customers, pg_binaries=args.pg_binaries, tls=args.tls)
    try:
        with open(os.devnull, "w") as quiet:
            env.start(out=quiet)
        node = env.start_node(workers=args.workers)
        assert env.stack is not None
        info = {"address": node.address, "metrics": f"http://127.0.0.1:{node.settings.metrics_port}/metrics",
                "node_pid": node.proc.pid, "customers": args.customers, "shards": args.shards,
                "workers": args.workers, "log": str(node.log_path), "tls": None}
        if env.pki is not None:
            cert, key = env.pki.client_cert("admin")   # every lookup scope (the 'switch' client lacks customers)
            info["tls"] = {"ca": str(env.pki.ca_cert), "cert": str(cert), "key": str(key)}
        print("READY " + json.dumps(info), flush=True)
        while not stop.wait(0.5):
            if os.getppid() != parent:   # the load generator died without stopping us
                break
            if node.proc.poll() is not None:
                print(f"stack: the node exited with code {node.proc.returncode}; see {node.log_path}",
                      file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        env.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
