"""The one progress bar of every long operation: bulk loads, re-fingerprinting, shard warming.

`label [######------------------]  25%  1,234/4,936 keys  copied 321  12,000 keys/s  ETA 3s` —
redrawn in place on a terminal (at most 10 times a second), one plain line every few seconds
otherwise (logs, CI), and always a last line from `finish()`. Progress goes to the stream the
caller passes (stderr by convention), so a command's answer on stdout stays parseable.
With `total=None` (not known in advance, e.g. a streamed export) the line has no bar, percentage
or ETA: `label  12,345 rows  cards  12,000 rows/s  1.0s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

TTY_REDRAW_SECONDS = 0.1    # a terminal redraw costs a write; ten a second looks continuous
LOG_LINE_SECONDS = 3.0      # a log gets a line every few seconds, not one per batch


class ProgressBar:
    """Counts `done` of `total` `unit`s (None: unknown); `detail` adds the caller's own counters."""

    WIDTH = 24

    def __init__(self, out: TextIO, label: str, total: int | None, *, unit: str = "rows", done: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.label, self.unit, self.clock = out, label, unit, clock
        self.total = None if total is None else max(total, 0)
        self.done = self.first_done = done
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.started = clock()
        self._last_draw = 0.0 if self.tty else self.started   # no log line before LOG_LINE_SECONDS

    def advance(self, n: int, detail: str = "") -> None:
        self.update(self.done + n, detail)

    def update(self, done: int, detail: str = "", *, final: bool = False) -> None:
        self.done = done
        now = self.clock()
        if not final and now - self._last_draw < (TTY_REDRAW_SECONDS if self.tty else LOG_LINE_SECONDS):
            return
        self._last_draw = now
        elapsed = max(now - self.started, 1e-9)
        rate = (done - self.first_done) / elapsed
        if self.total is None:
            line = (f"{self.label}  {done:,} {self.unit}{'  ' + detail if detail else ''}"
                    f"  {rate:,.0f} {self.unit}/s  {elapsed:.1f}s")
        else:
            total = max(self.total, done)
            fraction = done / total if total else 1.0
            filled = int(fraction * self.WIDTH)
            eta = f"ETA {max(total - done, 0) / rate:.0f}s" if rate > 0 and not final else f"{elapsed:.1f}s"
            line = (f"{self.label} [{'#' * filled}{'-' * (self.WIDTH - filled)}] {fraction:4.0%}  {done:,}/{total:,}"
                    f" {self.unit}{'  ' + detail if detail else ''}  {rate:,.0f} {self.unit}/s  {eta}")
        if self.tty:
            self.out.write("\r" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self, detail: str = "") -> None:
        self.update(self.done, detail, final=True)
