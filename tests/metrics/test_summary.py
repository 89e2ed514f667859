from __future__ import annotations

import math

import pytest
from scipy import stats

from medistill.metrics.summary import mean_ci, summarise_runs


def test_mean_ci_matches_the_t_interval():
    values = [0.7, 0.8, 0.75, 0.9]
    summary = mean_ci(values)
    low, high = stats.t.interval(0.95, 3, loc=sum(values) / 4, scale=stats.sem(values))
    assert summary["mean"] == pytest.approx(0.7875)
    assert summary["ci95"] == pytest.approx([low, high])


def test_degenerate_cases():
    assert mean_ci([0.5])["ci95"] is None and mean_ci([0.5])["mean"] == 0.5
    assert mean_ci([math.nan])["mean"] is None
    runs = summarise_runs([{"a": 1.0, "b": 2.0}, {"a": 3.0}])
    assert runs["a"]["mean"] == 2.0 and runs["b"]["n"] == 1
