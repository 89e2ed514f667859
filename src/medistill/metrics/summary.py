"""Summaries over repeated runs (seeds, folds): mean and a 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean with a Student-t confidence interval over finite values; the interval is null below two values."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    summary: dict[str, Any] = {"values": list(values), "n": int(finite.size)}
    if finite.size == 0:
        return {**summary, "mean": None, "ci95": None}
    mean = float(finite.mean())
    if finite.size < 2:
        return {**summary, "mean": mean, "ci95": None}
    half = float(stats.t.ppf(0.5 + confidence / 2, finite.size - 1) * finite.std(ddof=1) / math.sqrt(finite.size))
    return {**summary, "mean": mean, "ci95": [mean - half, mean + half]}


def summarise_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric, the mean and CI over runs (a metric missing from a run counts as NaN there)."""
    names = list(dict.fromkeys(name for run in runs for name in run))
    return {name: mean_ci([float(run.get(name, math.nan)) for run in runs]) for name in names}
