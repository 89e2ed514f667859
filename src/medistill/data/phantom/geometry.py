"""Vectorised drawing primitives shared by every modality: coordinate frames, one soft shape, textures.

All arrays are float32 (H, W) in pixel coordinates (x right, y down). A *profile* is a soft
indicator in [0, 1]; its support (profile > 0) is the exact mask of what it draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


@lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (xx, yy), each (size, size) float32; cached and read-only."""
    axis = np.arange(size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


@dataclass(frozen=True)
class Frame:
    """The patient's own coordinates: u right, v down, both about -1..1 across the body.

    Patient variation (size, position, rotation) is a similarity transform from pixels to (u, v),
    so anatomy is written once in (u, v) and every patient differs only by this frame.
    """

    size: int
    cx: float
    cy: float
    scale: float  # pixels per unit of u or v
    angle: float  # radians, positive rotates the patient clockwise on screen
    mirror: bool = False  # u grows to the left on screen (a right breast drawn chest wall right)

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        xx, yy = pixel_grid(self.size)
        c, s = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        dx = (xx - np.float32(self.cx)) / np.float32(-self.scale if self.mirror else self.scale)
        dy = (yy - np.float32(self.cy)) / np.float32(self.scale)
        return c * dx + s * dy, -s * dx + c * dy

    def to_pixels(self, u: float, v: float) -> tuple[float, float]:
        c, s = np.cos(self.angle), np.sin(self.angle)
        sign = -1.0 if self.mirror else 1.0
        return (self.cx + sign * self.scale * (c * u - s * v), self.cy + self.scale * (s * u + c * v))


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float, edge: float) -> np.ndarray:
    """Soft ellipse profile in frame units; `edge` is the width of the soft rim (inside the ellipse)."""
    rho = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)
    return smoothstep((1.0 - rho) * (min(ru, rv) / edge))


@dataclass(frozen=True)
class Shape:
    """A star-shaped region around a centre, in pixels.

    The boundary radius at polar angle t is
    `radius * (1 + sum(a * cos(k t + phase)) + sum(length * max(0, cos(t - t_i)) ** sharpness))`
    along an ellipse of the given aspect; harmonics give lobulated or irregular outlines, spikes give
    spicules. `edge` is the soft rim width in pixels; `core` in [0, 1] lowers the interior relative to
    the rim (0 keeps a solid interior; architectural distortion uses 1: spicules without a mass).
    """

    cx: float
    cy: float
    radius: float
    aspect: float = 1.0
    angle: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()  # (k, amplitude, phase)
    spikes: tuple[tuple[float, float], ...] = ()  # (angle, length in radii)
    sharpness: float = 60.0
    edge: float = 1.5
    core: float = 0.0

    def reach(self) -> float:
        """A radius in pixels that contains the whole shape."""
        bulge = 1.0 + sum(abs(a) for _, a, _ in self.harmonics) + max((length for _, length in self.spikes), default=0.0)
        return self.radius * bulge * max(self.aspect, 1.0 / self.aspect) + self.edge + 2.0


def draw(shape: Shape, size: int) -> np.ndarray:
    """The shape's profile on a size x size canvas, computed only in its bounding window."""
    out = np.zeros((size, size), dtype=np.float32)
    reach = shape.reach()
    x0, x1 = max(0, int(shape.cx - reach)), min(size, int(np.ceil(shape.cx + reach)) + 1)
    y0, y1 = max(0, int(shape.cy - reach)), min(size, int(np.ceil(shape.cy + reach)) + 1)
    if x0 >= x1 or y0 >= y1:
        return out
    xx, yy = pixel_grid(size)
    dx = xx[y0:y1, x0:x1] - np.float32(shape.cx)
    dy = yy[y0:y1, x0:x1] - np.float32(shape.cy)
    c, s = np.float32(np.cos(shape.angle)), np.float32(np.sin(shape.angle))
    a = (c * dx + s * dy) / np.float32(np.sqrt(shape.aspect))
    b = (-s * dx + c * dy) * np.float32(np.sqrt(shape.aspect))
    rho = np.sqrt(a * a + b * b)
    theta = np.arctan2(b, a)
    bound = np.ones_like(rho)
    for k, amplitude, phase in shape.harmonics:
        bound += np.float32(amplitude) * np.cos(np.float32(k) * theta + np.float32(phase))
    spike_part = np.zeros_like(rho)
    for direction, length in shape.spikes:
        lobe = np.maximum(np.cos(theta - np.float32(direction)), 0.0) ** np.float32(shape.sharpness)
        spike_part = np.maximum(spike_part, np.float32(length) * lobe)
    boundary = np.float32(shape.radius) * (bound + spike_part)
    profile = smoothstep((boundary - rho) / np.float32(shape.edge))
    if shape.spikes:
        # spicules are thin and fainter than the body of the lesion
        body = smoothstep((np.float32(shape.radius) * bound - rho) / np.float32(shape.edge))
        profile = np.maximum(body * np.float32(1.0 - shape.core), 0.55 * profile * (spike_part > 0.02))
    out[y0:y1, x0:x1] = profile
    return out


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random texture: `cells` x `cells` random values, bicubic-upsampled."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    field = np.asarray(image, dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


@lru_cache(maxsize=8)
def _frequency_radius2(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    return fx * fx + fy * fy


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with periodic boundary via the FFT (sigma in pixels); no-op for sigma <= 0."""
    if sigma <= 0:
        return image
    size = image.shape[0]
    transfer = np.exp(-2.0 * np.pi**2 * sigma**2 * _frequency_radius2(size)).astype(np.float32)
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape).astype(np.float32)


def stamp_dots(size: int, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Small Gaussian dots (calcifications), each drawn in its own little window; peak 1."""
    out = np.zeros((size, size), dtype=np.float32)
    xx, yy = pixel_grid(size)
    for (cx, cy), r in zip(centres, radii):
        reach = int(np.ceil(2.5 * r)) + 1
        x0, x1 = max(0, int(cx) - reach), min(size, int(cx) + reach + 1)
        y0, y1 = max(0, int(cy) - reach), min(size, int(cy) + reach + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        d2 = (xx[y0:y1, x0:x1] - np.float32(cx)) ** 2 + (yy[y0:y1, x0:x1] - np.float32(cy)) ** 2
        dot = np.exp(-d2 / np.float32(2.0 * r * r))
        dot[dot < 0.05] = 0.0
        np.maximum(out[y0:y1, x0:x1], dot, out=out[y0:y1, x0:x1])
    return out


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box [x1, y1, x2, y2] of a boolean mask, x2/y2 exclusive; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def sample_point(rng: np.random.Generator, region: np.ndarray) -> tuple[float, float]:
    """A uniformly random pixel (x, y) where `region` is true (sub-pixel jittered)."""
    flat = np.flatnonzero(region)
    if flat.size == 0:
        raise ValueError("empty region")
    index = int(flat[rng.integers(flat.size)])
    y, x = divmod(index, region.shape[1])
    return x + float(rng.uniform(-0.5, 0.5)), y + float(rng.uniform(-0.5, 0.5))
