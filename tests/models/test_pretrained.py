"""Loading local Hugging Face ViT / CLIP-vision directories, saved from randomly initialised models."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from medistill.data.datasets import IMAGE_MEAN, IMAGE_STD  # noqa: E402
from medistill.errors import UsageError  # noqa: E402
from medistill.models.pretrained import DEFAULT_NORMALISATION, load_pretrained_vit  # noqa: E402

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)


def rgb_input(grey: torch.Tensor, family: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in DEFAULT_NORMALISATION[family])
    return (grey.expand(-1, 3, -1, -1) - mean) / std


def test_vit_directory_gives_the_original_outputs(tmp_path):
    torch.manual_seed(0)
    reference = transformers.ViTModel(transformers.ViTConfig(**SIZES), add_pooling_layer=False).eval()
    reference.save_pretrained(tmp_path)
    model = load_pretrained_vit(tmp_path, num_classes=3).eval()
    grey = torch.rand(2, 1, 32, 32)
    expected = reference(pixel_values=rgb_input(grey, "vit")).last_hidden_state
    ours = model((grey - IMAGE_MEAN) / IMAGE_STD)
    assert torch.allclose(ours["tokens"], expected, atol=1e-4)
    assert ours["logits"].shape == (2, 3)


def test_clip_vision_directory_gives_the_original_outputs(tmp_path):
    torch.manual_seed(0)
    reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SIZES)).eval()
    reference.save_pretrained(tmp_path)
    model = load_pretrained_vit(tmp_path, num_classes=2).eval()
    grey = torch.rand(2, 1, 32, 32)
    expected = reference(pixel_values=rgb_input(grey, "clip")).pooler_output
    assert torch.allclose(model((grey - IMAGE_MEAN) / IMAGE_STD)["embedding"], expected, atol=1e-4)


def test_position_embeddings_are_interpolated_for_another_size(tmp_path):
    transformers.ViTModel(transformers.ViTConfig(**SIZES), add_pooling_layer=False).save_pretrained(tmp_path)
    model = load_pretrained_vit(tmp_path, num_classes=2, image_size=64)
    assert model.pos_embed.shape == (1, 65, 32)
    assert model(torch.randn(1, 1, 64, 64))["logits"].shape == (1, 2)


def test_wrong_directories_say_what_is_wrong(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        load_pretrained_vit(tmp_path, num_classes=2)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match="'bert' model"):
        load_pretrained_vit(tmp_path, num_classes=2)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", **SIZES}))
    with pytest.raises(UsageError, match="no \\*.safetensors"):
        load_pretrained_vit(tmp_path, num_classes=2)
