"""The `phantom` reader turns a written phantom world into records for each task."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from medistill.data.formats import open_dataset
from medistill.data.phantom import CXR_FINDINGS, MODALITIES
from medistill.data.records import GROUNDING_TASKS, SPLITS
from medistill.errors import DataError, UsageError


def _cases(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "cases.jsonl").read_text().splitlines()]


def test_labels_task_gives_one_record_per_image(tiny_phantom: Path) -> None:
    cases = {c["uid"]: c for c in _cases(tiny_phantom)}
    records = list(open_dataset("phantom", tiny_phantom).records())
    assert len(records) == len(cases) and Counter(r.modality for r in records) == Counter({m: 24 for m in MODALITIES})
    for record in records:
        case = cases[record.uid]
        assert Path(record.image).is_absolute() and Path(record.image).is_file()
        assert record.split in SPLITS and record.view and record.study_id and record.patient_id
        assert "FINDINGS:" in record.report and isinstance(record.table, dict)
        assert [tuple(map(int, (r.box.x1, r.box.y1, r.box.x2, r.box.y2))) for r in record.regions] == \
               [tuple(f["box"]) for f in case["findings"]]
        assert all(Path(r.mask).is_file() and "location" in r.attributes for r in record.regions)
        assert record.meta["clean_labels"] == case["clean_labels"]
        if record.modality == "cxr":
            assert set(record.labels) == set(CXR_FINDINGS) and set(record.labels.values()) <= {0.0, 1.0}
        if record.modality == "mammo":
            assert ("malignant" in record.labels) == bool(record.regions)
            assert "assessment" in record.table and "left or right breast" in record.table


def test_modality_filter(tiny_phantom: Path) -> None:
    records = list(open_dataset("phantom", tiny_phantom, modality="mr").records())
    assert len(records) == 24 and {r.modality for r in records} == {"mr"}


def test_vqa_task_gives_one_record_per_question(tiny_phantom: Path) -> None:
    entries = json.loads((tiny_phantom / "vqa-rad" / "VQA_RAD Dataset Public.json").read_text())
    records = list(open_dataset("phantom", tiny_phantom, task="vqa").records())
    assert len(records) == len(entries)
    assert {r.answer_type for r in records} == {"CLOSED", "OPEN"}
    assert all(r.question and r.answer and Path(r.image).is_file() for r in records)
    assert {r.split for r in records if r.meta["phrase_type"].startswith("test")} == {"test"}


def test_grounding_task_gives_a_record_per_image_and_task(tiny_phantom: Path) -> None:
    records = list(open_dataset("phantom", tiny_phantom, task="grounding", modality="ct").records())
    assert len(records) == 24 * len(GROUNDING_TASKS)
    assert Counter(r.task for r in records) == Counter({task: 24 for task in GROUNDING_TASKS})
    assert all(r.conversations and "<img>" in r.conversations[0].question for r in records)


def test_malformed_lines_are_located(tiny_phantom: Path, tmp_path: Path) -> None:
    root = tmp_path / "world"
    shutil.copytree(tiny_phantom, root, symlinks=True)
    lines = (root / "cases.jsonl").read_text().splitlines()
    broken = json.loads(lines[2])
    del broken["labels"]
    lines[2] = json.dumps(broken)
    lines[4] = "{not json"
    (root / "cases.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        list(open_dataset("phantom", root).records())
    assert caught.value.record == 3 and caught.value.field == "labels"
    reader = open_dataset("phantom", root, on_error="skip")
    assert len(list(reader.records())) == len(lines) - 2
    assert [p.record for p in reader.problems] == [3, 5]


def test_bad_options(tiny_phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="task"):
        open_dataset("phantom", tiny_phantom, task="segmentation")
    with pytest.raises(UsageError, match="cases.jsonl"):
        open_dataset("phantom", tmp_path)
