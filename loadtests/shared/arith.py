"""Arithmetic both reports use (bench/report.py, sweep/report.py): a rate that is nan rather than an
error when there is nothing to divide by, and JSON without the nan/inf that standard JSON lacks."""

from __future__ import annotations

import math
from typing import Any


def safe_div(a: float, b: float) -> float:
    """a / b, or nan when b is not positive (an empty window, no CPU time, no lookups: no rate)."""
    return a / b if b > 0 else math.nan


def json_safe(x: Any) -> Any:
    """`x` with every nan or infinite float, in any nested dict, list or tuple, replaced by None
    (tuples become lists), so that json.dumps writes standard JSON ("no value" is null)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x
