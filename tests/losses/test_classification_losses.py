from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medistill.losses.classification import masked_bce


def test_masked_bce_skips_unknown_targets():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, math.nan], [0.0, 1.0]])
    known = torch.tensor([[2.0, 0.5, 3.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    assert masked_bce(logits, targets).item() == pytest.approx(F.binary_cross_entropy_with_logits(*known).item())


def test_focal_matches_the_definition_and_gamma_zero_is_bce():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 3), (torch.rand(5, 3) < 0.3).float()
    targets[0, 1] = math.nan
    assert masked_bce(logits, targets, 0.0).item() == masked_bce(logits, targets).item()
    known = ~torch.isnan(targets)
    p, y = torch.sigmoid(logits[known]), targets[known]
    p_t = p * y + (1 - p) * (1 - y)
    expected = (-(1 - p_t) ** 2 * p_t.log()).mean()
    assert masked_bce(logits, targets, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_weighs_confident_labels_down():
    targets = torch.ones(1, 2)
    logits = torch.tensor([[4.0, -1.0]])  # one confident and right, one wrong
    per_label = [masked_bce(logits[:, i:i + 1], targets[:, i:i + 1], 2.0) / masked_bce(logits[:, i:i + 1],
                 targets[:, i:i + 1]) for i in range(2)]
    assert per_label[0] < 0.001 and per_label[1] > 0.5
