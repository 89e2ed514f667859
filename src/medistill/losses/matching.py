"""Hard-negative mining for image-text matching (ITM), as in ALBEF and AMiF.

For each image one negative text is drawn with probability `softmax` of its similarity row (the
positive excluded), so that texts the model confuses with the right one are drawn most often. AMiF's
released code samples from raw cosines, which are not probabilities (negative values); we softmax them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_hard_negatives(similarity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row of a square similarity matrix, the column of one sampled negative (never the diagonal)."""
    rows = similarity.shape[0]
    if rows < 2:
        raise ValueError("hard-negative mining needs a batch of at least 2 pairs")
    logits = similarity.detach().float().clone()
    logits.fill_diagonal_(float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def itm_loss(logits: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the two-way match / no-match head; `matched` holds 1 for true pairs and 0 for negatives."""
    return F.cross_entropy(logits.float(), matched.long())
