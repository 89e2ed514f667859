from __future__ import annotations

import torch

from medistill.explain.attention import attention_rollout, cls_attention, to_image


def test_rollout_of_identity_attention_stays_on_cls():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    assert torch.allclose(attention_rollout([eye, eye]), torch.zeros(2, 4))


def test_rollout_follows_attention_to_a_patch():
    # every token attends to patch 2 (token 3): the CLS relevance concentrates there
    layer = torch.zeros(1, 1, 5, 5)
    layer[..., 3] = 1.0
    rollout = attention_rollout([layer, layer])
    assert rollout.argmax().item() == 2
    assert cls_attention([layer]).argmax().item() == 2


def test_to_image_upsamples_and_normalises():
    scores = torch.zeros(1, 4)
    scores[0, 3] = 1.0  # bottom-right patch of a 2x2 grid
    maps = to_image(scores, 8)
    assert maps.shape == (1, 8, 8)
    assert maps.min() == 0 and maps.max() == 1
    assert maps[0, 7, 7] == 1 and maps[0, 0, 0] == 0
