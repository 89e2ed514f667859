"""Phantom generation speed on one core: cases per second in memory and written to disk (goal 50/s)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from bench.common import best_time, figure

GOAL = 50.0  # cases per second on one core at 256 x 256


def _one_core() -> None:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def run(full: bool, device: str = "cpu") -> list[dict[str, Any]]:
    _one_core()
    from medistill.data.phantom import MODALITIES, PhantomKnobs, generate_case, write_phantom

    knobs = PhantomKnobs(image_size=256)
    per_modality = 50 if full else 15
    total = per_modality * len(MODALITIES)

    def in_memory() -> None:
        for modality in MODALITIES:
            for index in range(per_modality):
                generate_case(0, index, modality, knobs)

    def to_disk() -> None:
        with tempfile.TemporaryDirectory() as folder:
            write_phantom(os.path.join(folder, "world"), cases=per_modality, seed=0, knobs=knobs)

    baseline = f"goal: {GOAL:g} cases/s"
    return [
        figure("phantom: cases/s in memory (1 core, 256 px)", total / best_time(in_memory), "cases/s", baseline, GOAL, 1.0),
        figure("phantom: cases/s written to disk (1 core, 256 px)", total / best_time(to_disk), "cases/s", baseline, GOAL, 1.0),
    ]
