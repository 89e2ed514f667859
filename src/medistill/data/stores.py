"""Shared stores for multimodal training: every distinct image decoded once, every distinct text tokenised
once (and, for a frozen text encoder, encoded once). Datasets then hold only indices into the stores, and
a batch gathers its rows: no decoding or tokenising inside the training loop.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm

from medistill.data.datasets import ImageLabelDataset
from medistill.data.records import Record
from medistill.models.text import TextEncoder

log = logging.getLogger(__name__)


class ImageStore:
    """Distinct image files decoded at `image_size`, as uint8 (N, H, W); `index(path)` gives a row."""

    def __init__(self, paths: Sequence[str], image_size: int) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.rows = {path: row for row, path in enumerate(self.paths)}
        records = [Record(uid=path, image=path) for path in self.paths]
        self.images = ImageLabelDataset(records, [], image_size).images
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def index(self, path: str) -> int:
        return self.rows[path]


class TextStore:
    """Distinct texts tokenised by `encoder`'s tokenizer; with `encode=True`, also their token features.

    `batch(rows)` returns `{prefix}_ids` / `{prefix}_mask` (and `{prefix}_features` when encoded), trimmed to
    the longest text of the batch. Features are kept in bf16 to halve their memory.
    """

    def __init__(self, texts: Sequence[str], encoder: TextEncoder, *, encode: bool, batch_size: int = 64,
                 progress: bool = False) -> None:
        self.texts = list(dict.fromkeys(texts))
        self.rows = {text: row for row, text in enumerate(self.texts)}
        tokens = encoder.tokenize(self.texts) if self.texts else {"input_ids": torch.zeros(0, 1, dtype=torch.long),
                                                                  "attention_mask": torch.zeros(0, 1, dtype=torch.long)}
        self.ids, self.mask = tokens["input_ids"], tokens["attention_mask"]
        self.features: torch.Tensor | None = None
        if encode:
            self.features = self._encode(encoder, batch_size, progress)

    @torch.no_grad()
    def _encode(self, encoder: TextEncoder, batch_size: int, progress: bool) -> torch.Tensor:
        was_training = encoder.training
        encoder.eval()
        device = next(encoder.parameters()).device
        chunks = []
        starts = range(0, len(self.texts), batch_size)
        for start in tqdm(starts, desc="encode texts", unit="batch", disable=not (progress and sys.stderr.isatty()),
                          leave=False):
            ids, mask = self.ids[start:start + batch_size], self.mask[start:start + batch_size]
            length = int(mask.sum(1).max())
            out = encoder(ids[:, :length].to(device), mask[:, :length].to(device))["tokens"]
            chunks.append(torch.nn.functional.pad(out, (0, 0, 0, self.ids.shape[1] - length)).to(torch.bfloat16).cpu())
        encoder.train(was_training)
        log.info("encoded %d texts with the frozen text encoder", len(self.texts))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.ids.shape[1], encoder.width, dtype=torch.bfloat16)

    def __len__(self) -> int:
        return len(self.texts)

    def index(self, text: str) -> int:
        return self.rows[text]

    def batch(self, rows: torch.Tensor, prefix: str = "text") -> dict[str, torch.Tensor]:
        mask = self.mask[rows]
        length = max(1, int(mask.sum(1).max())) if len(rows) else 1
        out = {f"{prefix}_ids": self.ids[rows, :length], f"{prefix}_mask": mask[:, :length]}
        if self.features is not None:
            out[f"{prefix}_features"] = self.features[rows, :length]
        return out


def drop_tokens(mask: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A second "view" of texts: each real token except the first (CLS) dropped from the mask with `fraction`."""
    keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= fraction
    keep[:, 0] = True
    return mask * keep.to(mask.dtype)


def random_views(images: torch.Tensor, *, scale: tuple[float, float] = (0.6, 1.0), degrees: float = 10.0,
                 contrast: float = 0.15) -> torch.Tensor:
    """Random zoom-in crops with a small rotation and contrast jitter of uint8 images (B, H, W), normalised
    as (B, 1, H, W) floats: the "two augmentations" of the multi-view loss when a study has one view."""
    from medistill.data.datasets import normalise

    batch, device = images.shape[0], images.device
    x = normalise(images).unsqueeze(1)
    zoom = torch.empty(batch, device=device).uniform_(*scale).sqrt()
    angle = torch.empty(batch, device=device).uniform_(-degrees, degrees) * math.pi / 180
    shift = (1 - zoom)[:, None] * (torch.rand(batch, 2, device=device) * 2 - 1)
    theta = torch.stack([
        torch.stack([zoom * angle.cos(), -zoom * angle.sin(), shift[:, 0]], dim=1),
        torch.stack([zoom * angle.sin(), zoom * angle.cos(), shift[:, 1]], dim=1)], dim=1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    views = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    gain = 1 + torch.empty(batch, 1, 1, 1, device=device).uniform_(-contrast, contrast)
    return views * gain
