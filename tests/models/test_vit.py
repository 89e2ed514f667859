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


def test_conv_stem_width_and_depth_options():
    default = create_model("vit-nano", image_size=32, patch_size=8, num_classes=2, stem="conv")
    explicit = create_model("vit-nano", image_size=32, patch_size=8, num_classes=2, stem="conv", stem_width=0,
                            stem_convs=1)
    assert [tuple(p.shape) for p in default.patch_embed.parameters()] == \
        [tuple(p.shape) for p in explicit.patch_embed.parameters()]
    convs = [m for m in default.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 96]  # three strided stages, then the 1x1 projection
    model = create_model("vit-nano", image_size=32, patch_size=8, num_classes=2, stem="conv", stem_width=32,
                         stem_convs=2)
    convs = [m for m in model.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 96, 96, 96]
    assert [c.stride[0] for c in convs] == [2, 1, 2, 1, 2, 1, 1]
    out = model(torch.randn(2, 1, 32, 32), return_attentions=True)
    assert out["tokens"].shape == (2, 17, 96) and out["attentions"][-1].shape == (2, 3, 17, 17)
    rebuilt = vit_from_architecture(model.architecture())
    rebuilt.load_state_dict(model.state_dict())
    with pytest.raises(ConfigError, match="stem_convs"):
        create_model("vit-nano", image_size=32, patch_size=8, stem="conv", stem_convs=0)


def test_checkpoints_without_stem_options_still_load():
    model = create_model("vit-nano", image_size=32, patch_size=8, num_classes=2, stem="conv")
    old = {k: v for k, v in model.architecture().items() if k not in ("stem_width", "stem_convs")}
    vit_from_architecture(old).load_state_dict(model.state_dict())
