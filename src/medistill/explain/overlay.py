"""Pictures for people: grey images with region outlines, encoded as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


PALETTE = ((255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (255, 120, 255), (255, 160, 64))


def to_rgb(grey: np.ndarray) -> np.ndarray:
    """A float (H, W) image in [0, 1] as uint8 RGB."""
    return np.repeat((np.clip(grey, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def mask_edge(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a boolean mask."""
    padded = np.pad(mask, 1, mode="constant")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def outline(rgb: np.ndarray, mask: np.ndarray, color: Sequence[int]) -> np.ndarray:
    """Draw the boundary of `mask` (same size as `rgb`) onto a copy of `rgb`."""
    drawn = rgb.copy()
    drawn[mask_edge(mask)] = color
    return drawn


def png_bytes(rgb: np.ndarray, scale: int = 1) -> bytes:
    image = Image.fromarray(rgb)
    if scale != 1:
        image = image.resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def colour_layer(saliency: np.ndarray) -> np.ndarray:
    """A saliency map in [0, 1] as an opaque uint8 RGBA layer in the 'jet' colour map."""
    from matplotlib import colormaps

    return (255 * colormaps["jet"](np.clip(saliency, 0, 1))).round().astype(np.uint8)


def heatmap(grey: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A saliency map in [0, 1] blended over a grey image with the 'jet' colour map, as uint8 RGB."""
    colours = colour_layer(saliency)[..., :3] / 255.0
    base = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2)
    return (255 * ((1 - alpha) * base + alpha * colours)).round().astype(np.uint8)
