from __future__ import annotations

import pytest
import torch

from medistill.errors import ConfigError
from medistill.models import MODELS, create_model
from medistill.models.vit import vit_from_architecture


def test_variants_are_registered():
    assert {"vit-nano", "vit-tiny", "vit-small", "vit-base"} <= set(MODELS)
    with pytest.raises(ConfigError, match="did you mean 'vit-tiny'"):
        create_model("vit-tiy")


def test_outputs_and_attention_agree_with_the_fused_path():
    torch.manual_seed(0)
    model = create_model("vit-nano", image_size=32, patch_size=8, num_classes=3).eval()
    images = torch.randn(2, 1, 32, 32)
    fused = model(images)
    explicit = model(images, return_attentions=True)
    assert fused["logits"].shape == (2, 3)
    assert fused["tokens"].shape == (2, 17, 96) and fused["embedding"].shape == (2, 96)
    assert "attentions" not in fused
    assert torch.allclose(fused["logits"], explicit["logits"], atol=1e-5)
    attentions = explicit["attentions"]
    assert len(attentions) == 4 and attentions[0].shape == (2, 3, 17, 17)
    assert torch.allclose(attentions[-1].sum(-1), torch.ones(2, 3, 17), atol=1e-5)


def test_architecture_round_trip():
    model = create_model("vit-nano", image_size=32, patch_size=8, num_classes=2)
    rebuilt = vit_from_architecture(model.architecture())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(model.eval()(x)["logits"], rebuilt.eval()(x)["logits"])


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="not a multiple of patch size"):
        create_model("vit-nano", image_size=30, patch_size=8)
