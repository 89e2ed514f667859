"""Data-pipeline speed: read + decode + resize to 224 px on one core, and the preprocessed cache.

Images: the real VQA-RAD JPEGs when ../shared/data/vqa_rad is present, else synthetic JPEGs of a
similar size (the figure's name says which).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import figure
from medistill.data.cache import ImageCache
from medistill.data.imaging import load_image

SIZE = 224
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa_rad" / "VQA_RAD Image Folder"
RATE_GOAL = 100.0  # images / s on one core (the requirement)
CACHE_GOAL = 5.0  # second epoch at least 5x faster than the first


def _images(folder: Path, count: int) -> tuple[list[Path], str]:
    if REAL.is_dir():
        paths = sorted(REAL.glob("*.jpg"))
        return (paths * (1 + count // max(len(paths), 1)))[:count], "VQA-RAD"
    rng = np.random.default_rng(0)
    paths = []
    for index in range(min(count, 64)):
        array = (rng.random((600, 700)) * 40 + np.linspace(0, 200, 700)).astype(np.uint8)
        paths.append(folder / f"synthetic_{index}.jpg")
        Image.fromarray(array).save(paths[-1], quality=90)
    return (paths * (1 + count // len(paths)))[:count], "synthetic 700x600 JPEG"


def _plain_load(path: Path) -> np.ndarray:
    """The straightforward pipeline the optimised one is compared with: full decode, float, resize."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    resized = Image.fromarray(array, mode="F").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _rate(function, paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        function(path)
    return len(paths) / (time.perf_counter() - start)


def run(full: bool, device: str = "cpu") -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    count = 945 if full else 200
    with tempfile.TemporaryDirectory() as folder:
        paths, source = _images(Path(folder), count)
        plain = _rate(_plain_load, paths)
        rate = _rate(lambda path: load_image(path, size=SIZE), paths)
        unique = list(dict.fromkeys(paths))
        with ImageCache(Path(folder) / "cache", size=SIZE) as cache:
            first = _rate(cache.load, unique)
            cache.flush()
            second = _rate(cache.load, unique)
    return [
        figure(f"data: read+decode+resize {SIZE}px, 1 core ({source})", rate, "images/s",
               f"the required {RATE_GOAL:g} images/s (plain Pillow pipeline: {plain:.0f} images/s)", RATE_GOAL, 1.0),
        figure(f"data: cached second epoch ({source}, {len(unique)} images)", second, "images/s",
               f"first epoch, decoding and filling the cache: {first:.0f} images/s", first, CACHE_GOAL),
    ]
