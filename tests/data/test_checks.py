"""`check_dataset` / `format_check_report` on fixtures and, when present, on the real copies."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from medistill.data.checks import check_dataset, format_check_report
from medistill.errors import DataError

sys.path.insert(0, str(Path(__file__).parent / "formats"))
from format_layouts import WRITERS  # noqa: E402


def test_report_counts_leakage_and_unreferenced_images(tmp_path):
    report = check_dataset("vqa-rad", WRITERS["vqa-rad"](tmp_path))
    json.dumps(report)  # JSON-ready
    assert report["format"] == "vqa-rad" and report["records"] == 6
    assert report["splits"] == {"train": 4, "test": 2} and report["images"] == 3 and report["image_files"] == 4
    assert report["answer_types"] == {"CLOSED": 3, "OPEN": 3}
    assert report["question_types"]["PRES, POS"] == 1
    assert report["unreferenced_images"] == ["VQA_RAD Image Folder/synpic_unused.jpg"]
    assert [group["records"] for group in report["leakage"]] == [["vqa-rad/3", "vqa-rad/4"]]
    assert report["duplicates"] == [] and report["problems"] == [] and report["problem_count"] == 1
    text = format_check_report(report)
    assert "splits: train 4, test 2" in text and "train/test leakage: 1" in text and "1 problem(s)" in text


def test_missing_images_duplicates_and_skipped_records(tmp_path):
    root = WRITERS["nih-cxr"](tmp_path)
    (root / "images" / "00000002_000.png").unlink()
    entries = root / "Data_Entry_2017.csv"
    lines = entries.read_text().splitlines()
    entries.write_text("\n".join([*lines, lines[1], "00000009_000.png,Mass"]) + "\n")
    with pytest.raises(DataError, match="short row"):
        check_dataset("nih-cxr", root)
    report = check_dataset("nih-cxr", root, on_error="skip")
    assert report["missing_images"] == ["images/00000002_000.png"]
    assert [group["records"] for group in report["duplicates"]] == [["00000001_000", "00000001_000"]]
    assert report["problems"] == [{"file": "Data_Entry_2017.csv", "record": 6,
                                   "message": "field 'follow_up': short row: 2 cells, expected 11"}
                                  ]
    assert report["problem_count"] == 3
    assert report["regions"]["boxes"] == 5 and report["labels"]["Mass"]["positive"] == 1
    text = format_check_report(report)
    assert "images referenced but missing: 1" in text and "Data_Entry_2017.csv: record 6" in text


def test_image_level_leakage(tmp_path):
    root = WRITERS["cbis-ddsm"](tmp_path)
    with (root / "mass_case_description_train_set.csv").open(newline="") as handle:
        first = list(csv.reader(handle))[1]
    with (root / "mass_case_description_test_set.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow(first)
    report = check_dataset("cbis-ddsm", root)
    assert [group["splits"] for group in report["leakage"]] == [["test", "train"]]
    assert report["duplicates"] == []  # two abnormalities of one image are not duplicates


@pytest.mark.realdata
@pytest.mark.parametrize(("name", "folder", "expected"), [
    ("vqa-rad", "vqa_rad", {"records": 2248, "splits": {"train": 1797, "test": 451}, "images": 314,
                            "image_files": 315}),
    ("mini-mias", "mini_mias", {"records": 322, "images": 322, "annotation_rows": 330}),
    ("nih-cxr", "nih_cxr_bbox", {"records": 253, "images": 253}),
])
def test_real_copies_report_exact_counts(shared_data, name, folder, expected):
    root = shared_data / folder
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    report = check_dataset(name, root)
    assert {key: report[key] for key in expected} == expected
    assert report["problems"] == [] and report["missing_images"] == []
    if name == "vqa-rad":
        assert len(report["leakage"]) == 1 and len(report["unreferenced_images"]) == 1
        assert report["answer_types"] == {"CLOSED": 1299, "OPEN": 949}
    if name == "nih-cxr":
        assert report["regions"]["boxes"] == 283 and "Infiltrate" not in report["regions"]["labels"]
    if name == "mini-mias":
        assert report["regions"]["circles"] == 119
