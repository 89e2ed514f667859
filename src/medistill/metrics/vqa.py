"""Med-VQA accuracy: exact match after normalisation, under every convention METHODS.md section 2 asks for.

- `open` / `closed` / `overall` split by the dataset's own `answer_type` (as the reader normalised it);
- `yes_no_convention`: the released AMiF code's rule instead, a question is closed when its reference answer
  is yes or no; reported beside the first, never mixed with it;
- `per_question_type`: a compound type such as VQA-RAD's "PRES, POS" counts toward each of its parts
  (so the table's counts can add up to more than the number of questions);
- `per_category` (VQA-Med-2019 records only): modality, plane, organ, abnormality and overall.

Every group is `{"accuracy": fraction in [0, 1] or None when empty, "correct": int, "n": int}`.
A prediction is right when its normalised text equals any accepted answer (VQA-Med-2019 test answers list
alternatives separated by `#`; the reader keeps them in `meta["answers"]`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from medistill.data.records import Record

YES_NO = frozenset({"yes", "no"})
VQA_MED_2019_CATEGORIES = ("modality", "plane", "organ", "abnormality")
VQA_MED_2019_PREFIX = "vqa-med-2019/"
NO_QUESTION_TYPE = "(none)"

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower-case, collapse runs of whitespace to one space, strip, and drop one final period."""
    text = _SPACES.sub(" ", str(text).lower()).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def accepted_answers(record: Record) -> list[str]:
    """The record's normalised reference answers: every `#` alternative when the reader kept them, else
    `answer`; duplicates removed, order kept (the first is the primary answer)."""
    raw = record.meta.get("answers") or ([] if record.answer is None else [record.answer])
    if not raw:
        raise ValueError(f"record {record.uid} has no answer: it is not a VQA record")
    return list(dict.fromkeys(normalize_answer(answer) for answer in raw))


def is_correct(prediction: str, record: Record) -> bool:
    """Exact match of the normalised prediction against any accepted answer."""
    return normalize_answer(prediction) in accepted_answers(record)


def question_types(record: Record) -> list[str]:
    """The parts of a (possibly compound, comma-separated) question type, each once; `(none)` when unset."""
    if not record.question_type or not record.question_type.strip():
        return [NO_QUESTION_TYPE]
    parts = (part.strip() for part in record.question_type.split(","))
    return list(dict.fromkeys(part for part in parts if part)) or [NO_QUESTION_TYPE]


def _group(outcomes: Iterable[bool]) -> dict[str, Any]:
    values = list(outcomes)
    correct = sum(values)
    return {"accuracy": correct / len(values) if values else None, "correct": correct, "n": len(values)}


def _answer_type(record: Record) -> str:
    kind = (record.answer_type or "").strip().upper()
    if kind not in ("OPEN", "CLOSED"):
        raise ValueError(f"record {record.uid} has answer_type {record.answer_type!r}; expected OPEN or CLOSED")
    return kind


def _is_vqa_med_2019(record: Record) -> bool:
    return record.uid.startswith(VQA_MED_2019_PREFIX)


def vqa_accuracy(predictions: Sequence[str], records: Sequence[Record]) -> dict[str, Any]:
    """Accuracy of `predictions[i]` against `records[i]` under every convention (see the module docstring).

    Keys: `overall`, `open`, `closed`, `yes_no_convention` (`overall`, `open`, `closed`), `per_question_type`,
    and `per_category` (modality, plane, organ, abnormality, overall) when any record is from VQA-Med-2019.
    """
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records: "
                         "pass exactly one prediction per record, in record order")
    right = [is_correct(prediction, record) for prediction, record in zip(predictions, records)]
    kinds = [_answer_type(record) for record in records]
    yes_no = [accepted_answers(record)[0] in YES_NO for record in records]

    by_type: dict[str, list[bool]] = {}
    for outcome, record in zip(right, records):
        for part in question_types(record):
            by_type.setdefault(part, []).append(outcome)

    result: dict[str, Any] = {
        "overall": _group(right),
        "open": _group(ok for ok, kind in zip(right, kinds) if kind == "OPEN"),
        "closed": _group(ok for ok, kind in zip(right, kinds) if kind == "CLOSED"),
        "yes_no_convention": {
            "overall": _group(right),
            "open": _group(ok for ok, closed in zip(right, yes_no) if not closed),
            "closed": _group(ok for ok, closed in zip(right, yes_no) if closed),
        },
        "per_question_type": {name: _group(by_type[name]) for name in sorted(by_type)},
    }
    med = [(ok, record) for ok, record in zip(right, records) if _is_vqa_med_2019(record)]
    if med:
        result["per_category"] = {
            **{category: _group(ok for ok, record in med if (record.question_type or "").lower() == category)
               for category in VQA_MED_2019_CATEGORIES},
            "overall": _group(ok for ok, _ in med),
        }
    return result


class VQAAccuracy:
    """MONAI-style accumulator: `update` per batch, `aggregate` for `vqa_accuracy` over all, `reset`."""

    def __init__(self) -> None:
        self._predictions: list[str] = []
        self._records: list[Record] = []

    def update(self, predictions: Sequence[str], records: Sequence[Record]) -> None:
        if len(predictions) != len(records):
            raise ValueError(f"{len(predictions)} predictions for {len(records)} records in one batch")
        self._predictions.extend(predictions)
        self._records.extend(records)

    def aggregate(self) -> dict[str, Any]:
        return vqa_accuracy(self._predictions, self._records)

    def reset(self) -> None:
        self._predictions.clear()
        self._records.clear()
