"""Training curves from a run's log.jsonl, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(events: list[dict[str, Any]], metric: str) -> bytes:
    """Training loss and the validation `metric` against the optimiser step, as PNG bytes."""
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval" and e.get(metric) is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3), dpi=90)
    left.plot([e["step"] for e in train], [e["loss"] for e in train])
    left.set(xlabel="step", ylabel="training loss")
    right.plot([e["step"] for e in evals], [e[metric] for e in evals], marker="o")
    right.set(xlabel="step", ylabel=f"validation {metric}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
