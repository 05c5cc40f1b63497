"""The locust scenarios' result checks (loadtests/scenarios/locustfile.py) with a fake stub: what each
call reports through locust's request event, hence what the sweep counts as lookups and failures.

The locustfile makes grpc gevent-cooperative when imported (grpc_user.py), which must not happen in
the test process (other tests run grpc servers on asyncio): each check runs in a child interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BATCH = textwrap.dedent("""
    import json, random, types
    import grpc
    from loadtests.scenarios import locustfile as lf
    from loadtests.scenarios.grpc_user import LocustInterceptor
    from loadtests.shared.keys import Key
    from server.proto import crs_pb2 as pb

    fired = []
    env = types.SimpleNamespace(events=types.SimpleNamespace(
        request=types.SimpleNamespace(fire=lambda **kw: fired.append(kw))))
    # Five keys that should exist and one that should not; the node answers two of the known ones UNAVAILABLE.
    keys = [Key("pan", "OK", pan=str(i)) for i in range(5)] + [Key("pan", "NOT_FOUND", pan="9")]
    codes = [0, 14, 0, 14, 0, 5]
    reply = pb.BatchResolveResponse(results=[pb.LookupResult(code=c, correlation_id=str(i))
                                             for i, c in enumerate(codes)])

    class Details(grpc.ClientCallDetails):
        def __init__(self, method, timeout, metadata):
            self.method, self.timeout, self.metadata, self.credentials = method, timeout, metadata, None

    class Call:
        def code(self): return grpc.StatusCode.OK
        def result(self): return reply
        def details(self): return ""

    class Stub:   # as grpc.intercept_channel runs the interceptor, or without it (the raw stub)
        def __init__(self, interceptor): self.interceptor = interceptor
        def BatchResolve(self, request, timeout=None, metadata=None):
            assert len(request.keys) == len(keys)
            if self.interceptor is None:
                return reply
            details = Details("/crs.v1.LookupService/BatchResolve", timeout, metadata)
            return self.interceptor.intercept_unary_unary(lambda d, r: Call(), details, request).result()

    user = object.__new__(lf.CrsUser)
    user.environment, user.timeout, user.rng, user.batch_range = env, 5.0, random.Random(1), (6, 6)
    user.keys = types.SimpleNamespace(any_key=lambda kinds, it=iter(keys): next(it))
    user.stub, user.raw_stub = Stub(LocustInterceptor(env)), Stub(None)
    user.batch()
    print(json.dumps([{"name": e["name"], "failed": e["exception"] is not None,
                       "lookups": (e.get("context") or {}).get("lookups", 1)} for e in fired]))
""")


def _events(script: str) -> list[dict[str, object]]:
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    events: list[dict[str, object]] = json.loads(done.stdout.strip().splitlines()[-1])
    return events


def test_a_batch_counts_as_lookups_only_the_keys_answered_as_expected() -> None:
    """A BatchResolve of 6 keys, 2 answered UNAVAILABLE: 4 lookups (3 found, 1 expected NOT_FOUND) and 2
    failures. The call's own event counted all 6 as lookups, the failed keys too, so the sweep's lookups/s
    (and the capacity model's CPU per lookup, from calibrate:batch) counted keys the service failed."""
    events = _events(BATCH)
    lookups = sum(int(str(e["lookups"])) for e in events if not e["failed"])
    failures = [e for e in events if e["failed"]]
    assert lookups == 4, events
    assert len(failures) == 2 and all(e["name"] == "BatchResolve pan" for e in failures), events


STREAM = textwrap.dedent("""
    import json, random, types
    import gevent
    from loadtests.scenarios import locustfile as lf
    from loadtests.shared.keys import Key

    fired, consumers = [], []
    env = types.SimpleNamespace(events=types.SimpleNamespace(
        request=types.SimpleNamespace(fire=lambda **kw: fired.append(kw))))

    class Failed(Exception):
        def code(self): return types.SimpleNamespace(name="UNAVAILABLE")
        def details(self): return "the node went away"

    class Stub:   # grpc reads the request iterator on a thread of its own (a greenlet under gevent)
        def StreamResolve(self, requests, timeout=None):
            consumers.append(gevent.spawn(lambda: [None for _ in requests]))
            gevent.sleep(0.05)          # the window's keys are sent; no answer comes back
            raise Failed()

    user = object.__new__(lf.CrsUser)
    user.environment, user.timeout, user.rng = env, 5.0, random.Random(1)
    user.stream_keys, user.stream_window = 50, 4
    user.keys = types.SimpleNamespace(any_key=lambda kinds: Key("pan", "OK", pan="4"))
    user.raw_stub = Stub()
    user.stream()
    gevent.sleep(0.2)
    print(json.dumps({"consumer_done": consumers[0].dead,
                      "events": [{"name": e["name"], "failed": e["exception"] is not None} for e in fired]}))
""")


def test_a_failed_stream_leaves_no_request_reader_waiting() -> None:
    """A stream that fails with keys outstanding: its request generator waited for a window slot that
    no answer would ever free, so grpc's request reader (a greenlet per stream) waited for ever; a load
    test against a failing node piled one up per failed stream. It ends with the call now."""
    done = subprocess.run([sys.executable, "-c", STREAM], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["events"] == [{"name": "StreamResolve", "failed": True}], out
    assert out["consumer_done"], out
