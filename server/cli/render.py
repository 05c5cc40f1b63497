"""How `crs` commands draw: aligned tables, byte sizes, percentages. Pure: text in, text out.

Progress bars are server/progress.py (the operations that report progress live below the CLI).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO


def table(rows: Sequence[Sequence[object]], out: TextIO | None = None) -> None:
    """Left-aligned columns as wide as their widest cell; the first row is the header."""
    if not rows:
        return
    out = out or sys.stdout
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def size(n: float) -> str:
    """Bytes in binary units: `512 B`, `1.5 KiB`, `12.0 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
