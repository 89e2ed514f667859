"""Classification metrics with scikit-learn as the reference; unknown (NaN) targets are left out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray, names: Sequence[str],
                       threshold: float = 0.5) -> dict[str, float]:
    """Per-label AUROC and accuracy plus their macro means over labels where both classes occur.

    `probabilities` and `targets` are (samples, labels); NaN targets are unknown and skipped.
    A label whose known targets hold one class only has AUROC NaN and stays out of the mean.
    """
    metrics: dict[str, float] = {}
    aurocs, accuracies = [], []
    for column, name in enumerate(names):
        known = ~np.isnan(targets[:, column])
        y, p = targets[known, column], probabilities[known, column]
        accuracy = float(((p >= threshold) == (y >= 0.5)).mean()) if len(y) else math.nan
        auroc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan
        metrics[f"auroc/{name}"] = auroc
        metrics[f"accuracy/{name}"] = accuracy
        if not math.isnan(auroc):
            aurocs.append(auroc)
        if not math.isnan(accuracy):
            accuracies.append(accuracy)
    metrics["auroc"] = float(np.mean(aurocs)) if aurocs else math.nan
    metrics["accuracy"] = float(np.mean(accuracies)) if accuracies else math.nan
    return metrics
