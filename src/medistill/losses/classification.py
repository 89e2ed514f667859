"""Task losses for classification heads with unknown (NaN) targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, focal_gamma: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy over known (non-NaN) targets only.

    `focal_gamma > 0` gives the focal loss (Lin et al., 2017): each term weighted by `(1 - p_t) ** gamma`,
    `p_t` the predicted probability of the target, so that well-classified labels count less.
    """
    known = ~torch.isnan(targets)
    logits, targets = logits.float(), torch.nan_to_num(targets)
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if focal_gamma > 0:
        p = torch.sigmoid(logits)
        losses = losses * (1 - (p * targets + (1 - p) * (1 - targets))) ** focal_gamma
    return (losses * known).sum() / known.sum().clamp(min=1)


def one_hot_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for one-hot targets (rows with unknown labels are skipped)."""
    known = ~torch.isnan(targets).any(dim=1)
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known].float(), targets[known].argmax(dim=1))
