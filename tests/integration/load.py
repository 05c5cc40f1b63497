"""A checked lookup load for fault and resharding tests: client threads, each with its own channel,
resolving demo cards until stopped; every answer checked, every failure recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from devstack.demo import demo_pan
from server import rpc
from server.proto import crs_pb2 as pb


class LookupLoad:
    def __init__(self, *, addresses: Sequence[str], cards: Callable[[], Sequence[int]],
                 check: Callable[[int, pb.Resolution], bool], threads: int = 4, stride: int = 7) -> None:
        """Thread t talks to addresses[t % len], walks `cards()` from offset t*97 in steps of `stride`,
        and counts an answer good when `check(card index, answer)` holds."""
        self.addresses, self.cards, self.check, self.stride = addresses, cards, check, stride
        self.stop_flag = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.shed = 0   # lookups the node shed over its capacity and the load retried
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def _run(self, t: int) -> None:
        cards = self.cards()
        i = t * 97
        with grpc.insecure_channel(self.addresses[t % len(self.addresses)]) as channel:
            lookup = rpc.stub(channel, "LookupService")
            while not self.stop_flag.is_set():
                n = cards[i % len(cards)]
                i += self.stride
                try:
                    good = self.check(n, self._resolve(lookup, n))
                    with self.lock:
                        if good:
                            self.ok += 1
                        else:
                            self.failures.append(f"card {n}: wrong answer")
                except grpc.RpcError as exc:
                    with self.lock:
                        self.failures.append(f"card {n}: {exc.code().name} {exc.details()}")

    def _resolve(self, lookup: Any, n: int) -> pb.Resolution:
        """One lookup, retried (at most 3 times, backing off 0.1-0.3 s) when the node shed it, over its
        capacity, as a client does on another node: on this 2-core machine a busy test run can starve a
        node long enough for its queue to look standing (CRS_SHED_QUEUE_MS). Sheds are counted apart; no
        other answer is retried, so what these tests check (faults, resharding) is not hidden by retries."""
        for attempt in range(4):
            try:
                return lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(n)), timeout=5)  # type: ignore[no-any-return]
            except grpc.RpcError as exc:
                shed = exc.code() == grpc.StatusCode.UNAVAILABLE and "over its capacity" in exc.details()
                if attempt == 3 or not shed:
                    raise
                with self.lock:
                    self.shed += 1
                time.sleep(0.1 * (attempt + 1))   # backoff, as a client's retry policy: past the shed interval
        raise AssertionError("unreachable")

    def __enter__(self) -> LookupLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(10)
