"""Task losses for classification heads with unknown (NaN) targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over known (non-NaN) targets only."""
    known = ~torch.isnan(targets)
    losses = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(targets), reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


def one_hot_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for one-hot targets (rows with unknown labels are skipped)."""
    known = ~torch.isnan(targets).any(dim=1)
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known].float(), targets[known].argmax(dim=1))
