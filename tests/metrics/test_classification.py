from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medistill.metrics.classification import multilabel_metrics


def test_matches_sklearn_and_skips_unknown_and_single_class_labels():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(50, 3)).astype(float)
    targets[:5, 0] = np.nan
    targets[:, 2] = 1.0  # one class only: AUROC undefined
    scores = np.clip(targets * 0.3 + rng.random((50, 3)) * 0.7, 0, 1)
    scores[np.isnan(scores)] = 0.5
    metrics = multilabel_metrics(scores, targets, ["a", "b", "c"])
    known = ~np.isnan(targets[:, 0])
    assert metrics["auroc/a"] == pytest.approx(roc_auc_score(targets[known, 0], scores[known, 0]))
    assert math.isnan(metrics["auroc/c"])
    assert metrics["auroc"] == pytest.approx((metrics["auroc/a"] + metrics["auroc/b"]) / 2)
    assert metrics["accuracy/a"] == pytest.approx(((scores[known, 0] >= 0.5) == targets[known, 0]).mean())


def test_perfect_and_inverted_scores():
    targets = np.array([[0.0], [1.0], [0.0], [1.0]])
    assert multilabel_metrics(targets.copy(), targets, ["x"])["auroc"] == 1.0
    assert multilabel_metrics(1 - targets, targets, ["x"])["auroc"] == 0.0
