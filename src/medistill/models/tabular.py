"""Tabular teachers: a column encoder fitted on the training rows, an MLP over it, and a leakage check.

Categorical columns get learned embeddings (index 0 = missing, 1 = a value never seen in training);
numeric columns are standardised with their training mean and std; every column gets a missing-value
indicator, so rows with gaps are used, never dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medistill.errors import UsageError

log = logging.getLogger(__name__)

Row = Mapping[str, Any]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


@dataclass
class TableSchema:
    """Columns and their statistics as seen on the training rows; saved with the teacher."""

    categorical: dict[str, list[str]] = field(default_factory=dict)  # column -> known values
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> (mean, std)

    @property
    def columns(self) -> list[str]:
        return [*self.categorical, *self.numeric]

    @classmethod
    def fit(cls, rows: Sequence[Row], columns: Sequence[str] | None = None) -> TableSchema:
        names = list(columns) if columns else list(dict.fromkeys(k for row in rows for k in row))
        schema = cls()
        for name in names:
            present = [row.get(name) for row in rows if not _missing(row.get(name))]
            numbers = [_as_number(v) for v in present]
            if present and all(n is not None for n in numbers):
                values = np.array(numbers, dtype=np.float64)
                schema.numeric[name] = (float(values.mean()), float(values.std()) or 1.0)
            else:
                schema.categorical[name] = sorted({str(v) for v in present})
        return schema

    def check(self, rows: Sequence[Row]) -> None:
        """Refuse rows with columns the teacher never saw (missing columns are fine: they become missing values)."""
        known = set(self.columns)
        unknown = sorted({k for row in rows for k in row} - known)
        if unknown:
            raise UsageError(f"table columns {unknown} were not seen when the teacher was trained "
                             f"(known: {', '.join(self.columns)}); drop them or retrain the teacher")

    def encode(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """Category indices (N, C_cat), standardised numbers (N, C_num) and missing indicators (N, C)."""
        self.check(rows)
        categories = torch.zeros(len(rows), len(self.categorical), dtype=torch.long)
        numbers = torch.zeros(len(rows), len(self.numeric))
        missing = torch.zeros(len(rows), len(self.columns))
        lookup = {name: {v: i + 2 for i, v in enumerate(values)} for name, values in self.categorical.items()}
        for r, row in enumerate(rows):
            for c, name in enumerate(self.categorical):
                value = row.get(name)
                if _missing(value):
                    missing[r, c] = 1
                else:
                    categories[r, c] = lookup[name].get(str(value), 1)
            for c, (name, (mean, std)) in enumerate(self.numeric.items()):
                number = None if _missing(row.get(name)) else _as_number(row.get(name))
                if number is None:
                    missing[r, len(self.categorical) + c] = 1
                else:
                    numbers[r, c] = (number - mean) / std
        return {"categories": categories, "numbers": numbers, "missing": missing}

    def to_dict(self) -> dict[str, Any]:
        return {"categorical": self.categorical, "numeric": {k: list(v) for k, v in self.numeric.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableSchema:
        return cls(dict(data["categorical"]), {k: (float(v[0]), float(v[1])) for k, v in data["numeric"].items()})


class TabularMLP(nn.Module):
    """Categorical embeddings + numbers + missing indicators into an MLP. Returns logits and embedding."""

    def __init__(self, schema: TableSchema, num_outputs: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.schema = schema
        self.embeddings = nn.ModuleList(
            nn.Embedding(len(values) + 2, min(16, (len(values) + 3) // 2 + 1)) for values in schema.categorical.values())
        width = sum(e.embedding_dim for e in self.embeddings) + len(schema.numeric) + len(schema.columns)
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, categories: torch.Tensor, numbers: torch.Tensor, missing: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [embed(categories[:, i]) for i, embed in enumerate(self.embeddings)]
        embedding = self.body(torch.cat([*parts, numbers, missing], dim=1))
        return {"logits": self.head(embedding), "embedding": embedding}


def single_column_auroc(rows: Sequence[Row], labels: Sequence[float]) -> dict[str, float]:
    """How well each column alone separates a binary label (AUROC folded to >= 0.5).

    A categorical column scores each value by its label rate; missing values form their own category.
    """
    y = np.asarray(labels, dtype=float)
    known = ~np.isnan(y)
    scores: dict[str, float] = {}
    if len(np.unique(y[known])) < 2:
        return scores
    for name in dict.fromkeys(k for row in rows for k in row):
        values = ["<missing>" if _missing(row.get(name)) else row.get(name) for row in rows]
        numbers = [_as_number(v) for v in values]
        if all(n is not None for n in numbers):
            score = np.array(numbers, dtype=float)
        else:
            keys = np.array([str(v) for v in values])
            rates = {k: y[known][keys[known] == k].mean() for k in np.unique(keys[known])}
            score = np.array([rates.get(k, 0.5) for k in keys])
        auroc = roc_auc_score(y[known], score[known])
        scores[name] = float(max(auroc, 1 - auroc))
    return scores


def warn_on_leaky_columns(rows: Sequence[Row], labels: Sequence[float], threshold: float = 0.9) -> list[str]:
    """Log a warning for each column that alone nearly determines the label; return their names."""
    leaky = [name for name, auroc in single_column_auroc(rows, labels).items() if auroc >= threshold]
    for name in leaky:
        log.warning("table column %r alone separates the label with AUROC >= %.2f: a teacher that sees it "
                    "learns little beyond it (e.g. CBIS-DDSM assessment nearly gives pathology away)", name, threshold)
    return leaky
