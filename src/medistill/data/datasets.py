"""Torch datasets over canonical records: images decoded once, kept as uint8, normalised per batch."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medistill.data.imaging import load_image
from medistill.data.records import Record

# Grey-level normalisation saved with every checkpoint (preprocessing contract).
IMAGE_MEAN = 0.5
IMAGE_STD = 0.25


def preprocessing(image_size: int) -> dict[str, float | int | str]:
    return {"image_size": image_size, "mean": IMAGE_MEAN, "std": IMAGE_STD, "channels": 1, "resize": "bilinear"}


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float() / 255.0 - IMAGE_MEAN) / IMAGE_STD


def patient_key(record: Record) -> str:
    """The record's patient id, else its study, image or record id: what a split must never divide."""
    return record.patient_id or record.study_id or record.image or record.uid


def patient_hash(record: Record) -> int:
    """A stable hash of the record's patient key, for splits that never split a patient."""
    return key_hash(patient_key(record))


def key_hash(key: str) -> int:
    """A stable 32-bit hash of a string (the same on every run and machine)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def held_out_by_key(key: str, fraction: float) -> bool:
    """Whether `key` falls in a stable `fraction` of all keys (a holdout that never depends on order)."""
    return key_hash(key) / 0xFFFFFFFF < fraction


def patient_holdout(records: Sequence[Record], fraction: float = 0.15) -> tuple[list[Record], list[Record]]:
    """Split records into (kept, held out) by a hash of the patient (or study, or image) id.

    The split is stable across runs and never puts one patient on both sides.
    """

    def held_out(record: Record) -> bool:
        return held_out_by_key(patient_key(record), fraction)

    return [r for r in records if not held_out(r)], [r for r in records if held_out(r)]


def split_for_validation(records: Sequence[Record], fraction: float = 0.15) -> tuple[list[Record], list[Record]]:
    """Train and val records: the reader's own val split when it has one, else a patient-level holdout."""
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    return (train, val) if val else patient_holdout(train, fraction)


def label_matrix(records: Sequence[Record], names: Sequence[str]) -> torch.Tensor:
    """Labels as a (records, names) float tensor, NaN where unknown; (0, names) for no records."""
    rows = [r.label_vector(list(names)) for r in records]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(names))


class ImageLabelDataset(Dataset):
    """Images and label vectors (NaN = unknown) of records, decoded once at `image_size`."""

    def __init__(self, records: Sequence[Record], label_names: Sequence[str], image_size: int) -> None:
        self.records = list(records)
        self.label_names = list(label_names)
        self.image_size = image_size
        self.images = torch.from_numpy(np.stack([self._decode(r) for r in self.records])) if self.records else \
            torch.empty(0, image_size, image_size, dtype=torch.uint8)
        self.labels = label_matrix(self.records, self.label_names)

    def _decode(self, record: Record) -> np.ndarray:
        if record.image is None:
            raise ValueError(f"record {record.uid} has no image")
        array = load_image(record.image, size=self.image_size)
        return np.round(array * 255.0).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int]) -> ImageLabelDataset:
        """A view of some samples that reuses the decoded images (no second decode)."""
        view = ImageLabelDataset.__new__(ImageLabelDataset)
        index = torch.as_tensor(list(indices), dtype=torch.long)
        view.records = [self.records[i] for i in index.tolist()]
        view.label_names, view.image_size = self.label_names, self.image_size
        view.images, view.labels = self.images[index], self.labels[index]
        return view

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"image": self.images[index], "labels": self.labels[index], "index": index}

    def label_prevalence(self) -> dict[str, float]:
        known = ~torch.isnan(self.labels)
        positives = torch.nan_to_num(self.labels).sum(0)
        return {name: float(positives[i] / known[:, i].sum()) if known[:, i].any() else math.nan
                for i, name in enumerate(self.label_names)}
