"""A one-line progress bar for long operations (bulk load, re-fingerprinting, warming)."""

from __future__ import annotations

from typing import TextIO


class Progress:
    """A one-line bar on a terminal, one plain line per step otherwise (logs, CI)."""

    def __init__(self, total: int, out: TextIO, *, what: str = "loading demo data") -> None:
        self.total, self.done, self.out, self.what = total, 0, out, what
        self.tty = out.isatty()

    def advance(self, n: int, label: str) -> None:
        self.done += n
        pct = min(100, 100 * self.done // max(self.total, 1))
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        line = f"{self.what} [{bar}] {pct:3d}% {self.done:,} rows ({label})"
        self.out.write(("\r" + line) if self.tty else (line + "\n"))
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")
