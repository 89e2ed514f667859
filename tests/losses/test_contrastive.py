import math

import pytest
import torch
import torch.nn.functional as F

from medistill.losses.contrastive import smoothed_targets, soft_contrastive_loss, soft_cross_entropy, teacher_targets
from medistill.losses.matching import itm_loss, sample_hard_negatives


def test_without_teacher_and_smoothing_it_is_symmetric_infonce():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    temperature = torch.tensor(0.07)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    got = soft_contrastive_loss(a, b, temperature, smoothing=0.0)
    assert torch.allclose(got, expected, atol=1e-5)


def test_label_smoothing_moves_mass_off_the_positive():
    targets = smoothed_targets(4, 4, 0.1)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert math.isclose(float(targets[0, 0]), 0.9 + 0.1 / 4, rel_tol=1e-6)
    assert math.isclose(float(targets[0, 1]), 0.1 / 4, rel_tol=1e-6)


def test_a_student_equal_to_its_teacher_has_zero_loss():
    torch.manual_seed(1)
    image, text = torch.randn(5, 16), torch.randn(5, 16)
    scale = 20.0
    loss = soft_contrastive_loss(image, text, torch.tensor(1 / scale), teacher=(image, text), teacher_scale=scale,
                                 flexibility=0.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    # and a different student is penalised
    assert float(soft_contrastive_loss(text, image, torch.tensor(1 / scale), teacher=(image, text),
                                       teacher_scale=scale, flexibility=0.0)) > 1e-3


def test_flexibility_raises_the_positive_pair():
    torch.manual_seed(2)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    plain = teacher_targets(a, b, 10.0, 0.0)
    flexible = teacher_targets(a, b, 10.0, 1.0)
    assert torch.all(flexible.diagonal() > plain.diagonal())
    assert torch.allclose(flexible.sum(1), torch.ones(4))


def test_soft_cross_entropy_is_kl():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    expected = float((p * (p.log() - logits.log_softmax(-1))).sum())
    assert float(soft_cross_entropy(logits, p)) == pytest.approx(expected, rel=1e-5)


def test_hard_negatives_follow_the_softmaxed_similarity_and_never_the_positive():
    similarity = torch.tensor([[9.0, 2.0, 0.0, -5.0], [0.0, 9.0, 0.0, 0.0], [1.0, 1.0, 9.0, 1.0], [0.0, 0.0, 0.0, 9.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(similarity, generator) for _ in range(4000)])
    assert not (draws == torch.arange(4)).any()
    share = (draws[:, 0] == 1).float().mean()  # softmax over [2, 0, -5] puts ~0.88 on column 1
    expected = math.exp(2) / (math.exp(2) + 1 + math.exp(-5))
    assert abs(float(share) - expected) < 0.03
    # a negative similarity gets a small positive probability (raw cosines would be invalid probabilities)
    assert float((draws[:, 0] == 3).float().mean()) < 0.01


def test_itm_loss_prefers_the_right_decision():
    logits_right = torch.tensor([[-3.0, 3.0], [3.0, -3.0]])
    matched = torch.tensor([1, 0])
    assert float(itm_loss(logits_right, matched)) < float(itm_loss(-logits_right, matched))


def test_hard_negatives_need_two_pairs():
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.zeros(1, 1))
