"""Initialise a medistill ViT from a local Hugging Face ViT or CLIP vision checkpoint directory.

Only `config.json` and safetensors weights are read (never a pickle, never the network). Checkpoints
expect RGB input normalised with their own per-channel mean and std; medistill feeds one grey channel
normalised with (0.5, 0.25). Both are linear, so the patch embedding absorbs the difference exactly:
for a grey image replicated to RGB, the converted model gives the original model's outputs.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from medistill.data.datasets import IMAGE_MEAN, IMAGE_STD
from medistill.errors import UsageError
from medistill.models.vit import VisionTransformer, ViTSpec

log = logging.getLogger(__name__)

# Per-family defaults when the directory has no preprocessor_config.json.
DEFAULT_NORMALISATION = {
    "vit": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
}

# (pattern over the checkpoint's names after prefix stripping, medistill name); {i} is the layer.
VIT_NAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed.{0}"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", "blocks.{0}.norm1.{1}"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", "blocks.{0}.norm2.{1}"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", "blocks.{0}.attn.{1}.{2}"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", "blocks.{0}.attn.proj.{1}"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", "blocks.{0}.mlp.0.{1}"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", "blocks.{0}.mlp.3.{1}"),
    (r"layernorm\.(weight|bias)", "norm.{0}"),
]
CLIP_NAMES = [
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),
    (r"embeddings\.patch_embedding\.weight", "patch_embed.weight"),
    (r"pre_layrnorm\.(weight|bias)", "pre_norm.{0}"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", "blocks.{0}.norm1.{1}"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", "blocks.{0}.norm2.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", "blocks.{0}.attn.{1}.{2}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "blocks.{0}.attn.proj.{1}"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "blocks.{0}.mlp.0.{1}"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "blocks.{0}.mlp.3.{1}"),
    (r"post_layernorm\.(weight|bias)", "norm.{0}"),
]
QKV_PARTS = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def read_vision_config(directory: Path) -> tuple[str, dict[str, Any]]:
    """The family ('vit' or 'clip') and the vision config of a checkpoint directory."""
    path = directory / "config.json"
    if not path.is_file():
        raise UsageError(f"{directory} has no config.json: pass a local Hugging Face ViT or CLIP directory")
    config = json.loads(path.read_text(encoding="utf-8"))
    model_type = config.get("model_type", "")
    if model_type == "vit":
        return "vit", config
    if model_type in ("clip", "clip_vision_model"):
        return "clip", config.get("vision_config", config)
    raise UsageError(f"{directory} holds a {model_type or 'unknown'!r} model; a ViT or CLIP checkpoint is needed")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All safetensors weights of a directory, sharded or not."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{directory} has no *.safetensors weights (pickled .bin weights are not loaded: "
                         "convert them with transformers' save_pretrained(safe_serialization=True))")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def spec_from_config(family: str, config: dict[str, Any], **overrides: Any) -> ViTSpec:
    hidden = int(config["hidden_size"])
    fields = {
        "image_size": int(config.get("image_size", 224)),
        "patch_size": int(config.get("patch_size", 16)),
        "width": hidden,
        "depth": int(config["num_hidden_layers"]),
        "heads": int(config["num_attention_heads"]),
        "mlp_ratio": int(config["intermediate_size"]) / hidden,
        "activation": "quick_gelu" if config.get("hidden_act") == "quick_gelu" else "gelu",
        "norm_eps": float(config.get("layer_norm_eps", 1e-12 if family == "vit" else 1e-5)),
        "pre_norm": family == "clip",
    }
    return ViTSpec(**{**fields, **overrides})


def _normalisation(directory: Path, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = directory / "preprocessor_config.json"
    mean, std = DEFAULT_NORMALISATION[family]
    if path.is_file():
        pre = json.loads(path.read_text(encoding="utf-8"))
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _fold_grey_input(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-embedding weights for one grey channel normalised as medistill does.

    With g the grey value in [0, 1] and n = (g - IMAGE_MEAN) / IMAGE_STD medistill's input, the RGB model sees
    x_c = (g - mean_c) / std_c = (IMAGE_STD * n + IMAGE_MEAN - mean_c) / std_c for every channel c.
    """
    scaled = weight / std.view(1, -1, 1, 1)
    grey_weight = IMAGE_STD * scaled.sum(dim=1, keepdim=True)
    shift = (scaled * (IMAGE_MEAN - mean).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return grey_weight, bias + shift


def _resize_positions(positions: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic interpolation of the patch position embeddings to a new grid (the CLS position is kept)."""
    cls, patches = positions[:, :1], positions[:, 1:]
    old = int(round(patches.shape[1] ** 0.5))
    if old == grid:
        return positions
    log.info("interpolating position embeddings from a %dx%d to a %dx%d grid", old, old, grid, grid)
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def _rename(weights: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    table = VIT_NAMES if family == "vit" else CLIP_NAMES
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        short = re.sub(r"^(vit|vision_model|model\.vision_model)\.", "", name)
        for pattern, target in table:
            match = re.fullmatch(pattern, short)
            if match:
                renamed[target.format(*match.groups())] = tensor
                break
    return renamed


def _merge_qkv(renamed: dict[str, torch.Tensor], depth: int) -> None:
    for layer in range(depth):
        for kind in ("weight", "bias"):
            parts = {QKV_PARTS[p]: renamed.pop(f"blocks.{layer}.attn.{p}.{kind}")
                     for p in list(QKV_PARTS) if f"blocks.{layer}.attn.{p}.{kind}" in renamed}
            if len(parts) != 3:
                raise UsageError(f"layer {layer} of the checkpoint lacks query/key/value {kind}s")
            renamed[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]])


def load_pretrained_vit(directory: str | Path, *, num_classes: int, image_size: int | None = None,
                        dropout: float = 0.0) -> VisionTransformer:
    """A ViT initialised from a local HF ViT / CLIP-vision directory, with a new `num_classes` head."""
    directory = Path(directory)
    family, config = read_vision_config(directory)
    base = spec_from_config(family, config)
    spec = spec_from_config(family, config, num_classes=num_classes, dropout=dropout,
                            image_size=image_size or base.image_size)
    renamed = _rename(read_weights(directory), family)
    _merge_qkv(renamed, spec.depth)
    if family == "clip":
        renamed["cls_token"] = renamed["cls_token"].view(1, 1, -1)
        renamed["pos_embed"] = renamed["pos_embed"].unsqueeze(0)
        renamed["patch_embed.bias"] = torch.zeros(spec.width)
    mean, std = _normalisation(directory, family)
    renamed["patch_embed.weight"], renamed["patch_embed.bias"] = _fold_grey_input(
        renamed["patch_embed.weight"].float(), renamed["patch_embed.bias"].float(), mean, std)
    renamed["pos_embed"] = _resize_positions(renamed["pos_embed"].float(), spec.grid)
    model = VisionTransformer(spec)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    missing = [name for name in missing if not name.startswith("head.")]
    if missing or unexpected:
        raise UsageError(f"{directory} does not match a {family} ViT: missing {missing[:5]}, unexpected {unexpected[:5]}")
    log.info("initialised a %d-layer ViT from %s (%s)", spec.depth, directory, family)
    return model
