"""Tiny helpers every benchmark shares: best-of-N wall time and the result record."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The best wall time of `repeats` calls of `fn`, in seconds (the least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def figure(name: str, value: float, unit: str, baseline: str, reference: float, goal: float | None = None) -> dict[str, Any]:
    """One result: `value` compared with `reference` (described by `baseline`); met when ratio >= goal."""
    ratio = value / reference if reference else None
    met = None if goal is None or ratio is None else bool(ratio >= goal)
    return {"name": name, "value": round(value, 4), "unit": unit, "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 4), "goal": goal, "met": met}
