"""Reading a customer file ahead of the writer (`crs import customers`, docs/identity.md "Performance").

A batch's rows are read, validated and sealed (CPU: ~150 us a row) and then identified and written
(PostgreSQL: COPY, index upkeep, commit). Done one after the other, each waits for the other. Here
batch N+1 is prepared while batch N is written, in two ways:

- `InlineReader` parses in the event loop, handing it a turn every YIELD_EVERY rows, so the answers
  to the batch being written are read as they come and PostgreSQL works on the other core meanwhile;
- `ProcessReader` parses in a second process (multiprocessing, spawned), which sends each batch of
  validated rows through a pipe (the pipe's buffer keeps it at most a batch or two ahead): parsing
  then uses a core of its own while this process seals, identifies and writes. Starting it costs
  about half a second, so only files of PROCESS_READER_ROWS rows or more use it.

Either way the rows reach the writer in file order, each batch after the one before committed, and
the rejects file is written by whoever parses. Sealing (keyed hashes, encryption) stays in this
process: no key leaves it.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Generic, TypeVar

from server.cli.import_files import (
    CUSTOMER_COLUMNS,
    HeaderError,
    Reject,
    Rejects,
    SeenKeys,
    SourceFile,
    customer_row,
)

GC_YOUNG = 200_000              # allocations between two young collections during an import (bulk_gc)
YIELD_EVERY = 8                 # rows handled between two turns of the event loop (~1 ms)
PROCESS_READER_ROWS = 20_000    # files with at least this many lines are parsed by a second process
T = TypeVar("T")
Batch = tuple[list[Any], int]   # accepted rows, the last row number the batch reaches


def batches(source: SourceFile, rejects: Rejects, parse: Callable[[int, dict[str, str]], Any], size: int,
            every: int = 0) -> Iterator[Batch | None]:
    """Accepted rows in batches of `size`, with the last row each batch reaches; rejects written.
    The last batch may be empty. every > 0: also None after every `every` rows (a caller's turn)."""
    batch: list[Any] = []
    last = 1
    for n, (row, cells) in enumerate(source.read(), 1):
        last = row
        item = cells if isinstance(cells, Reject) else parse(row, cells)
        if isinstance(item, Reject):
            rejects.add(item)
        else:
            batch.append(item)
        if len(batch) >= size:
            yield batch, last
            batch = []
        if every and n % every == 0:
            yield None
    yield batch, last


class InlineReader:
    """Parses in this process, a turn of the event loop every YIELD_EVERY rows."""

    def __init__(self, path: Path, size: int, rejects_path: Path | None) -> None:
        self.source = SourceFile(path, CUSTOMER_COLUMNS)
        self.rejects = Rejects(rejects_path)
        self.size = size

    @property
    def rows_read(self) -> int:
        return self.source.rows_read

    @property
    def rejected(self) -> int:
        return self.rejects.count

    @property
    def unread(self) -> tuple[int, int] | None:
        return self.source.unread

    async def batches(self) -> AsyncIterator[Batch]:
        seen = SeenKeys()
        for item in batches(self.source, self.rejects, lambda r, c: customer_row(r, c, seen), self.size,
                            YIELD_EVERY):
            if item is None:
                await asyncio.sleep(0)
            else:
                yield item

    def close(self) -> None:
        self.rejects.close()


@contextmanager
def bulk_gc() -> Iterator[None]:
    """Python's cycle collector tuned for a bulk load (both import processes): with the default
    threshold (a young collection every 700 allocations) an import of 50,000 rows ran ~3,500 of them,
    2.2 of the importer's 6.4 CPU seconds, each promoting batch data that later collections scan
    again. The rows, tuples and strings of a batch hold no cycles; the objects alive before the load
    (modules, the match model) are frozen out of the scans, and a young collection runs every
    GC_YOUNG allocations: 77 collections, 0.01 s (at 50,000: 101, 0.3 s). Restored on exit:
    `import_customers` also runs inside other processes."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _read_in_child(path: str, size: int, rejects_path: str | None, out: Connection) -> None:
    """The second process: parse the file and send ("rows", batch, last, rows_read, rejected) per
    batch, then ("done", rows_read, rejected, unread); a bad header: ("header", problems)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to handle; it ends us
    # ... with SIGTERM (ProcessReader.close): unwind, so the rejects file gets what was refused so far
    # (killed outright, its buffer was lost: an interrupted import left an empty rejects file).
    signal.signal(signal.SIGTERM, _unwind)
    source, seen = SourceFile(Path(path), CUSTOMER_COLUMNS), SeenKeys()
    rejects = Rejects(Path(rejects_path) if rejects_path else None)
    with bulk_gc():
        _read_all(source, seen, rejects, size, out)


def _unwind(_signum: int, _frame: object) -> None:
    raise SystemExit(128 + signal.SIGTERM)


def _read_all(source: SourceFile, seen: SeenKeys, rejects: Rejects, size: int, out: Connection) -> None:
    try:
        for item in batches(source, rejects, lambda r, c: customer_row(r, c, seen), size):
            assert item is not None
            rows, last = item
            out.send(("rows", rows, last, source.rows_read, rejects.count))
        out.send(("done", source.rows_read, rejects.count, source.unread))
    except HeaderError as exc:
        out.send(("header", exc.problems))
    except SystemExit:             # the parent ended us (it is not reading any more)
        raise
    except BaseException as exc:   # the parent raises it: say what it was, never a cell's value
        out.send(("error", type(exc).__name__))
        raise
    finally:
        rejects.close()
        out.close()


class ProcessReader:
    """Parses in a spawned process; this process only receives validated rows."""

    def __init__(self, path: Path, size: int, rejects_path: Path | None) -> None:
        ctx = multiprocessing.get_context("spawn")    # no fork: the parent has an event loop and sockets
        self._recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_read_in_child, name="crs-import-reader", daemon=True,
                                   args=(str(path), size, str(rejects_path) if rejects_path else None, send))
        self.process.start()
        send.close()
        self.rows_read = self.rejected = 0
        self.unread: tuple[int, int] | None = None

    async def batches(self) -> AsyncIterator[Batch]:
        while True:
            try:
                message = await asyncio.to_thread(self._recv.recv)
            except EOFError:
                raise RuntimeError("the import's reader process ended without finishing the file") from None
            kind = message[0]
            if kind == "rows":
                _, rows, last, self.rows_read, self.rejected = message
                yield rows, last
            elif kind == "done":
                _, self.rows_read, self.rejected, self.unread = message
                return
            elif kind == "header":
                raise HeaderError(message[1])
            else:
                raise RuntimeError(f"the import's reader process failed: {message[1]}")

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=10)
        self._recv.close()


Reader = InlineReader | ProcessReader


def open_reader(path: Path, size: int, rejects_path: Path | None, lines: int) -> Reader:
    if lines >= PROCESS_READER_ROWS:
        return ProcessReader(path, size, rejects_path)
    return InlineReader(path, size, rejects_path)


async def sealed(batches: AsyncIterator[Batch], seal: Callable[[Any], Any]
                 ) -> AsyncIterator[tuple[list[Any], int, list[Any]]]:
    """Each batch with its rows' sealed records, a turn of the event loop every YIELD_EVERY rows."""
    async for rows, last in batches:
        seals = []
        for n, row in enumerate(rows, 1):
            seals.append(seal(row))
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        yield rows, last, seals


class ReadAhead(Generic[T]):
    """The next item of `items` made while the current one is used: batch N+1 is read and sealed
    while batch N is identified and written. One item ahead at most; items come in order. `close`
    stops the reading."""

    def __init__(self, items: AsyncIterator[T]) -> None:
        self.items = items
        self.pending: asyncio.Task[T | None] | None = None

    async def _next(self) -> T | None:
        try:
            return await anext(self.items)
        except StopAsyncIteration:
            return None

    async def next(self) -> T | None:
        if self.pending is None:
            self.pending = asyncio.ensure_future(self._next())
        item = await self.pending
        self.pending = asyncio.ensure_future(self._next()) if item is not None else None
        return item

    async def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            await asyncio.gather(self.pending, return_exceptions=True)
            self.pending = None
        aclose = getattr(self.items, "aclose", None)
        if aclose is not None:
            await aclose()
