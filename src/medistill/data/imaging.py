"""Image I/O: one function that reads any supported file into a float32 grey array in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medistill.errors import DataError


def load_image(path: str | Path, *, size: int | None = None) -> np.ndarray:
    """Read a grey image as float32 (H, W) scaled to [0, 1]; optionally resized to size x size."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            array = _to_float(image)
    except FileNotFoundError:
        raise DataError("image file not found", file=str(path)) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot decode image ({error})", file=str(path)) from None
    return resize(array, size) if size else array


def _to_float(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return np.clip(array / peak, 0.0, 1.0)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def resize(array: np.ndarray, size: int) -> np.ndarray:
    """Resize a float (H, W) array to size x size with bilinear filtering (antialiased when shrinking)."""
    if array.shape == (size, size):
        return array
    image = Image.fromarray(array.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
