from __future__ import annotations

import pytest
import torch

from medistill.losses.kd import bernoulli_kd, feature_kd, softmax_kd


def test_softmax_kd_zero_on_agreement_and_positive_otherwise():
    logits = torch.randn(4, 5)
    assert softmax_kd(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert softmax_kd(torch.randn(4, 5), logits, 2.0).item() > 0


def test_softmax_kd_matches_the_definition():
    torch.manual_seed(0)
    s, t, temperature = torch.randn(3, 4), torch.randn(3, 4), 2.0
    p = torch.softmax(t / temperature, -1)
    q = torch.softmax(s / temperature, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    assert softmax_kd(s, t, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bernoulli_kd_matches_the_definition_and_masks():
    torch.manual_seed(0)
    s, t, temperature = torch.randn(3, 4), torch.randn(3, 4), 2.0
    p, q = torch.sigmoid(t / temperature), torch.sigmoid(s / temperature)
    kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert bernoulli_kd(s, t, temperature).item() == pytest.approx(kl.mean().item() * 4, rel=1e-5)
    mask = torch.zeros(3, 4)
    mask[:, 0] = 1
    assert bernoulli_kd(s, t, temperature, mask).item() == pytest.approx(kl[:, 0].mean().item() * 4, rel=1e-5)
    assert bernoulli_kd(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gradient_pulls_the_student_towards_the_teacher():
    teacher = torch.tensor([[3.0, -1.0]])
    student = torch.zeros(1, 2, requires_grad=True)
    bernoulli_kd(student, teacher, 1.0).backward()
    assert student.grad[0, 0] < 0 < student.grad[0, 1]


def test_feature_kd():
    x = torch.randn(4, 8)
    assert feature_kd(x, 2 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_kd(x, x, "mse").item() == 0.0
    with pytest.raises(ValueError):
        feature_kd(x, x, "l3")
