"""Label-preserving random changes of training images, drawn per sample on every batch (on the batch's device).

Draws come from torch's global generator, like dropout, so the trainer's saved RNG state makes a resumed
run see the same augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medistill.errors import ConfigError


@dataclass
class AugmentConfig:
    """Off by default. Use `hflip` only where the labels carry no side (left / right)."""

    hflip: bool = False  # mirror left-right with probability 0.5
    shift: float = 0.0  # translate x and y each by up to this fraction of the image side
    scale: float = 0.0  # zoom by a factor drawn uniformly from [1 - scale, 1 + scale]

    def __post_init__(self) -> None:
        if not 0.0 <= self.shift < 0.5:
            raise ConfigError(f"augment.shift must lie in [0, 0.5), not {self.shift}")
        if not 0.0 <= self.scale < 1.0:
            raise ConfigError(f"augment.scale must lie in [0, 1), not {self.scale}")

    @property
    def active(self) -> bool:
        return self.hflip or self.shift > 0 or self.scale > 0


def augment_images(images: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Randomly flipped, shifted and zoomed copies of float images (B, C, H, W); edges repeat where uncovered."""
    if not config.active:
        return images
    batch, device = images.shape[0], images.device
    if config.hflip:
        flip = torch.rand(batch, device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if config.shift > 0 or config.scale > 0:
        zoom = 1 + (torch.rand(batch, device=device) * 2 - 1) * config.scale
        shift = (torch.rand(batch, 2, device=device) * 2 - 1) * 2 * config.shift  # grid coordinates span 2
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return images
