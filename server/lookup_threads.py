"""StreamResolve for the hybrid serving model: the same answers as LookupHandlers.StreamResolve, with
the keys read on a thread and near-cache hits answered there, misses resolved on the event loop.

While every key is answered at once (near-cache hits, bad keys), the gRPC thread that runs the call
reads each key and sends its answer, as the bare sync echo does. From the first miss on, a reader
thread takes each key off the stream, validates it and answers a near-cache hit at once; a miss
becomes a coroutine on the loop (at most `stream_window` per stream, as grpc.aio) whose result joins
the answers when it completes. The call's thread then only sends answers, in completion order, so one
slow key never holds up the keys behind it and a client that waits for each answer before sending
the next key still works. A stream that only hits holds one thread, not two: with 32 streams of 8
keys outstanding that lifted the node from 0.60x to 0.72x of the sync server's bare stream echo
(docs/decisions.md, "The streams' ceiling"). At most STREAM_UNSENT keys are read ahead of the
answers sent, as in grpc.aio. A corrupt message ends the call with INVALID_ARGUMENT; a cancelled
call cancels its misses.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

from server.caller import Caller
from server.encoding import RESOLUTION_FIELD
from server.errors import CrsError
from server.lookup import LookupHandlers
from server.lookup_stream import STREAM_UNSENT
from server.proto import crs_pb2 as pb
from server.resolver import Lookup

Submit = Callable[[Awaitable[bytes]], "concurrent.futures.Future[bytes]"]
_END = object()


def stream_resolve(lookup: LookupHandlers, keys: Iterator[pb.LookupKey], caller: Caller, *, submit: Submit,
                   on_end: Callable[[Callable[[], None]], Any]) -> Iterator[bytes]:
    """Answers for `keys` in completion order. `submit` runs a coroutine on the loop; `on_end`
    registers a callback for when the call ends however it ends (grpc's context.add_callback)."""
    keys = iter(keys)
    for key in keys:   # while every key is answered at once, the call's thread alone reads and answers
        cid, found, field = lookup.stream_key(key, caller)
        if isinstance(found, bytes):
            yield found
            continue
        yield from _with_reader(lookup, keys, caller, submit=submit, on_end=on_end, first=(cid, found, field, key))
        return


def _with_reader(lookup: LookupHandlers, keys: Iterator[pb.LookupKey], caller: Caller, *, submit: Submit,
                 on_end: Callable[[Callable[[], None]], Any],
                 first: tuple[str, Lookup, int, pb.LookupKey]) -> Iterator[bytes]:
    """From the stream's first miss (`first`: its id, lookup, field and key) on: a reader thread takes
    the keys, the call's thread sends the answers."""
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    window = threading.Semaphore(lookup.stream_window)
    # Keys read ahead of the answers sent (as grpc.aio): the first STREAM_UNSENT keys are read freely,
    # each later one takes a token that an answer sent left (a C-level queue, not threading.Semaphore).
    sent: queue.SimpleQueue[None] = queue.SimpleQueue()
    lock = threading.Lock()
    pending: set[concurrent.futures.Future[bytes]] = set()
    state = {"reading": True, "ended": False}

    def finish_if_done() -> None:   # under `lock`
        if not state["reading"] and not pending:
            answers.put(_END)

    def resolved(cid: str, field: int, key: pb.LookupKey, future: concurrent.futures.Future[bytes]) -> None:
        window.release()
        if not future.cancelled():
            try:
                answers.put(lookup.result_of(cid, future.result(), field, key))
            except CrsError as exc:
                answers.put(lookup.result_of(cid, exc, RESOLUTION_FIELD, key))
            except Exception as exc:   # not ours to answer per key: it ends the call, as in grpc.aio
                answers.put(exc)
        with lock:
            pending.discard(future)
            finish_if_done()

    def read() -> None:
        try:
            for n, key in enumerate(itertools.chain([first[3]], keys)):
                if n >= STREAM_UNSENT:
                    sent.get()
                    if state["ended"]:
                        break
                cid, found, field = first[:3] if n == 0 else lookup.stream_key(key, caller)
                if isinstance(found, bytes):    # answered now: a near-cache hit or a bad key
                    answers.put(found)
                    continue
                window.acquire()
                future = submit(lookup.resolver.resolve(found))
                with lock:
                    pending.add(future)
                future.add_done_callback(partial(resolved, cid, field, key))
        except Exception as exc:   # a corrupt message, or the call went away under the iterator
            answers.put(exc)
        with lock:
            state["reading"] = False
            finish_if_done()

    def cancel_all() -> None:
        with lock:
            futures = list(pending)
        for future in futures:
            future.cancel()
        state["ended"] = True
        sent.put(None)     # a reader waiting for room wakes, sees the end and stops
        answers.put(_END)

    if on_end(cancel_all) is False:   # the call ended already: grpc will not run it
        cancel_all()
    threading.Thread(target=read, name="crs-stream-reader", daemon=True).start()
    try:
        while (item := answers.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
            sent.put(None)
    finally:
        cancel_all()
