"""A checked lookup load for fault and resharding tests: client threads, each with its own channel,
resolving demo cards until stopped; every answer checked, every failure recorded."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

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
                    good = self.check(n, lookup.ResolveCard(pb.ResolveCardRequest(pan=demo_pan(n)), timeout=5))
                    with self.lock:
                        if good:
                            self.ok += 1
                        else:
                            self.failures.append(f"card {n}: wrong answer")
                except grpc.RpcError as exc:
                    with self.lock:
                        self.failures.append(f"card {n}: {exc.code().name} {exc.details()}")

    def __enter__(self) -> LookupLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(10)
