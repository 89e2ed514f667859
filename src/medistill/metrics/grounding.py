"""BiRD's Med-GRIT metrics for visual grounding (VG) and referring object classification (ROC), with baselines.

Protocol (BiRD's `eval_VG_score_modality.py` / `eval_RO_score_modality.py`, also used by ClinKD):
- VG: recall at IoU > 0.5 over ground-truth boxes: a ground-truth box is found when any valid predicted box
  of the same answer overlaps it with IoU > threshold (one predicted box may find several); answers whose
  reference holds no box are skipped (counted under `skipped`).
- ROC: an answer is correct when every word of the lower-cased reference (split on whitespace) occurs in the
  lower-cased answer as a substring, BiRD's `token in response` (so "kidney" is found in "kidneys";
  punctuation and `<ref>` tags stay part of the words).
- Both per modality, then the plain mean over the modalities that have at least one item (BiRD averages
  over its eight fixed modalities, scoring an absent one 0); `overall` pools all items.

Boxes are `<box>(x1,y1),(x2,y2)</box>` or Qwen2-VL's `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` on the
0-1000 grid. A malformed box (unclosed or nested tags, unbalanced brackets, not exactly two corners, a
non-number, a coordinate outside 0-999, x2 <= x1 or y2 <= y1) is a wrong box, never an error. Unlike
BiRD's script, untagged corners `(x1,y1),(x2,y2)` are not read as a box.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medistill.data.formats.med_grit import MODALITIES, QWEN_TOKENS, modality_of
from medistill.data.records import Box, Record

GRID_MAX = 999
UNKNOWN_MODALITY = "unknown"

_BOX_TAG = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_NUMBER = r"\s*(\d+(?:\.\d+)?)\s*"
_CORNERS = re.compile(rf"\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*")
_SPACES = re.compile(r"\s+")


def _med_grit_tokens(text: str) -> str:
    for token, replacement in QWEN_TOKENS.items():
        text = text.replace(token, replacement)
    return text


def parse_box(content: str) -> Box | None:
    """The box of one tag's content `(x1,y1),(x2,y2)` on the 0-1000 grid, or None when malformed."""
    match = _CORNERS.fullmatch(content)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(value) for value in match.groups())
    if max(x1, y1, x2, y2) > GRID_MAX or x2 <= x1 or y2 <= y1:
        return None
    return Box(x1, y1, x2, y2)


def parse_boxes(text: str) -> list[Box | None]:
    """Every box tag of `text` in order (either tag form), None for each malformed one."""
    return [parse_box(match.group(1)) for match in _BOX_TAG.finditer(_med_grit_tokens(text))]


def format_box(box: Box, qwen: bool = False) -> str:
    """`<box>(x1,y1),(x2,y2)</box>` (Qwen2-VL's `<|box_start|>` form when `qwen`), corners rounded."""
    corners = f"({round(box.x1)},{round(box.y1)}),({round(box.x2)},{round(box.y2)})"
    return f"<|box_start|>{corners}<|box_end|>" if qwen else f"<box>{corners}</box>"


def _modality(image_id: str | None) -> str:
    return (modality_of(image_id) if image_id else None) or UNKNOWN_MODALITY


def _summary(groups: dict[str, list[int]], score: str) -> dict[str, Any]:
    """Per-modality `{score, correct, n}` (Med-GRIT's modalities first), their plain mean and the pooled score."""
    order = [name for name in MODALITIES if name in groups] + sorted(set(groups) - set(MODALITIES))
    per = {name: {score: groups[name][0] / groups[name][1] if groups[name][1] else None,
                  "correct": groups[name][0], "n": groups[name][1]} for name in order}
    scored = [entry[score] for entry in per.values() if entry[score] is not None]
    correct, total = sum(c for c, _ in groups.values()), sum(n for _, n in groups.values())
    return {"mean": sum(scored) / len(scored) if scored else None,
            "overall": correct / total if total else None,
            "correct": correct, "n": total, "per_modality": per}


def _check_lengths(predictions: Sequence[str], references: Sequence[str], image_ids: Sequence[str | None]) -> None:
    if not len(predictions) == len(references) == len(image_ids):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references and {len(image_ids)} "
                         "image ids: pass one of each per item, in the same order")


def vg_recall(predictions: Sequence[str], references: Sequence[str], image_ids: Sequence[str | None], *,
              threshold: float = 0.5) -> dict[str, Any]:
    """VG recall@`threshold` per modality (from each image id's prefix), their mean and the pooled recall.

    Also `skipped` (references without a valid box), `malformed` (malformed predicted boxes) and `no_box`
    (scored answers without a valid box). A malformed reference box is not counted.
    """
    _check_lengths(predictions, references, image_ids)
    groups: dict[str, list[int]] = {}
    skipped = malformed = no_box = 0
    for prediction, reference, image_id in zip(predictions, references, image_ids):
        truths = [box for box in parse_boxes(reference) if box is not None]
        if not truths:
            skipped += 1
            continue
        parsed = parse_boxes(prediction)
        guesses = [box for box in parsed if box is not None]
        malformed += len(parsed) - len(guesses)
        no_box += not guesses
        found = sum(any(guess.iou(truth) > threshold for guess in guesses) for truth in truths)
        group = groups.setdefault(_modality(image_id), [0, 0])
        group[0] += found
        group[1] += len(truths)
    return {**_summary(groups, "recall"), "skipped": skipped, "malformed": malformed, "no_box": no_box}


def roc_correct(prediction: str, reference: str) -> bool:
    """BiRD's ROC rule: every whitespace-separated word of the lower-cased reference is a substring of the
    lower-cased prediction (Qwen2-VL's special tokens read as Med-GRIT's tags in both)."""
    answer = _med_grit_tokens(prediction).lower()
    return all(word in answer for word in _med_grit_tokens(reference).lower().split())


def roc_accuracy(predictions: Sequence[str], references: Sequence[str],
                 image_ids: Sequence[str | None]) -> dict[str, Any]:
    """ROC accuracy per modality (from each image id's prefix), their mean and the pooled accuracy."""
    _check_lengths(predictions, references, image_ids)
    groups: dict[str, list[int]] = {}
    for prediction, reference, image_id in zip(predictions, references, image_ids):
        group = groups.setdefault(_modality(image_id), [0, 0])
        group[0] += roc_correct(prediction, reference)
        group[1] += 1
    return _summary(groups, "accuracy")


def grounding_metrics(predictions: Sequence[str], records: Sequence[Record], *,
                      threshold: float = 0.5) -> dict[str, Any]:
    """`VG` and `ROC` scores of one prediction per Med-GRIT record (one question-answer turn each), the
    modality taken from the image file name; records of other tasks (RC, MIA) are left out."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records: pass one per record")
    by_task: dict[str, tuple[list[str], list[str], list[str | None]]] = {"VG": ([], [], []), "ROC": ([], [], [])}
    for prediction, record in zip(predictions, records):
        if record.task not in by_task:
            continue
        if len(record.conversations) != 1:
            raise ValueError(f"record {record.uid}: expected one question-answer turn, "
                             f"found {len(record.conversations)}")
        answers, references, image_ids = by_task[record.task]
        answers.append(prediction)
        references.append(record.conversations[0].answer)
        image_ids.append(Path(record.image).stem if record.image else None)
    return {"VG": vg_recall(*by_task["VG"], threshold=threshold), "ROC": roc_accuracy(*by_task["ROC"])}


def centre_box(fraction: float = 0.25) -> Box:
    """The VG baseline box: centred on the 0-1000 grid, covering `fraction` of the image's area (square
    corners rounded to the grid, clipped to 999)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    half = math.sqrt(fraction) * 500
    low, high = round(500 - half), min(round(500 + half), GRID_MAX)
    return Box(float(low), float(low), float(high), float(high))


def majority_answer(answers: Iterable[str]) -> str:
    """The ROC baseline answer: the most frequent lower-cased, whitespace-collapsed training answer (ties:
    the one seen first)."""
    counts = Counter(_SPACES.sub(" ", answer.lower()).strip() for answer in answers)
    if not counts:
        raise ValueError("no answers to take the majority of")
    return counts.most_common(1)[0][0]
