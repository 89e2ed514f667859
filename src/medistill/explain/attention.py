"""Attention maps of a ViT: last-layer CLS attention and attention rollout, upsampled to the image.

Rollout follows Abnar & Zuidema (2020): average heads, add the identity for the residual path,
renormalise rows, multiply through the layers, and read the CLS row over the patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cls_attention(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Last layer's CLS-to-patch attention averaged over heads: (batch, patches)."""
    return attentions[-1].float().mean(dim=1)[:, 0, 1:]


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """CLS-to-patch relevance after propagating attention through every layer: (batch, patches)."""
    first = attentions[0]
    tokens = first.shape[-1]
    identity = torch.eye(tokens, device=first.device)
    rollout = identity.expand(first.shape[0], tokens, tokens)
    for layer in attentions:
        mixed = layer.float().mean(dim=1) + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return rollout[:, 0, 1:]


def to_image(patch_scores: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Patch scores (batch, grid*grid) as maps (batch, H, W) in [0, 1], bilinearly upsampled."""
    grid = int(round(patch_scores.shape[-1] ** 0.5))
    if grid * grid != patch_scores.shape[-1]:
        raise ValueError(f"{patch_scores.shape[-1]} patches do not form a square grid")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    maps = F.interpolate(patch_scores.view(-1, 1, grid, grid), size=size, mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-12)
