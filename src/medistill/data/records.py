"""The canonical records every reader yields and every model consumes.

Coordinates are pixels of the original image, origin at the top-left, x to the right, y down.
Unknown labels are NaN (torchxrayvision's habit); a label that is absent from `labels` was never
annotated for this record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")
GROUNDING_TASKS = ("VG", "ROC", "RC", "MIA")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels, x1 < x2 and y1 < y2."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def iou(self, other: Box) -> float:
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Circle:
    """A circular region (mini-MIAS), centre and radius in pixels."""

    cx: float
    cy: float
    radius: float

    def bounding_box(self) -> Box:
        return Box(self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)


@dataclass(frozen=True)
class Region:
    """A finding's location: a label plus any of box, circle and mask file (a binary PNG or DICOM)."""

    label: str
    box: Box | None = None
    circle: Circle | None = None
    mask: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Turn:
    """One question-answer exchange of a grounding conversation."""

    question: str
    answer: str


@dataclass
class Record:
    """One sample. Which fields are set depends on the task the source supports.

    - classification: `labels`; localization: `regions`
    - privileged modalities: `report` (free text) and `table` (one row, column -> value or None)
    - VQA: `question`, `answer`, `answer_type` (CLOSED / OPEN), `question_type`
    - grounding: `conversations` and `task` (VG / ROC / RC / MIA)
    """

    uid: str
    image: str | None
    split: str = "train"
    study_id: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    view: str | None = None
    image_size: tuple[int, int] | None = None  # (width, height) when the reader knows it
    labels: dict[str, float] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    report: str | None = None
    table: dict[str, Any] | None = None
    question: str | None = None
    answer: str | None = None
    answer_type: str | None = None
    question_type: str | None = None
    conversations: list[Turn] = field(default_factory=list)
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def label_vector(self, names: list[str]) -> list[float]:
        """Labels in `names` order; NaN where unknown or never annotated."""
        return [float(self.labels.get(name, math.nan)) for name in names]
