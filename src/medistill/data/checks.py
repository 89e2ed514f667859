"""`medistill data check`: read a dataset with its reader and report counts and problems.

The report is one JSON-ready dict: counts per split, label, answer type, question type, modality and
task; images referenced but missing and image files never referenced; duplicate records; train/test
leakage (the same image across splits for image-level tasks, the same image-question-answer triple for
VQA); and every malformed record with its file and record number. `problem_count` counts what `--strict`
fails on: malformed records, missing images, duplicates and leakage (unreferenced files are reported but
are not problems: VQA-RAD ships one on purpose).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medistill.data.formats.base import Problem, open_dataset
from medistill.data.imaging import IMAGE_SUFFIXES
from medistill.data.records import Record

log = logging.getLogger(__name__)

_LIST_LIMIT = 20  # how many paths / groups the text report shows per list


def check_dataset(format_name: str, root: str | Path, *, on_error: str = "raise", **options: Any) -> dict:
    """Read `root` as `format_name` and return the check report (see the module docstring)."""
    reader = open_dataset(format_name, root, on_error=on_error, **options)
    records = list(reader.records())
    base = Path(root)
    referenced = _referenced_files(records)
    missing = sorted(_relative(path, base) for path in referenced if not Path(path).exists())
    image_dir = reader.referenced_image_dir()
    files = _image_files(image_dir) if image_dir is not None else None
    also = {path for record in records for path in record.meta.get("files", [])}
    unreferenced = sorted(_relative(path, base) for path in (files or set()) - referenced - also)
    duplicates, leakage = _duplicates_and_leakage(records)
    problems = [_problem_dict(problem, base) for problem in reader.problems]
    report = {
        "format": format_name,
        "root": str(base),
        "records": len(records),
        "images": len({record.image for record in records if record.image}),
        "image_files": None if files is None else len(files),
        "annotation_rows": sum(int(record.meta.get("source_rows", 1)) for record in records),
        "splits": _count(record.split for record in records),
        "patients": len({record.patient_id for record in records if record.patient_id}),
        "labels": _label_counts(records),
        "regions": _region_counts(records),
        "answer_types": _count(record.answer_type for record in records),
        "question_types": _count(record.question_type for record in records),
        "modalities": _count(record.modality for record in records),
        "tasks": _count(record.task for record in records),
        "missing_images": missing,
        "unreferenced_images": unreferenced,
        "duplicates": duplicates,
        "leakage": leakage,
        "problems": problems,
    }
    report["problem_count"] = len(problems) + len(missing) + len(duplicates) + len(leakage)
    log.info("checked %s at %s: %d records, %d problems", format_name, base, len(records),
             report["problem_count"])
    return report


def format_check_report(report: dict) -> str:
    """The human-readable text of a `check_dataset` report."""
    lines = [f"{report['format']} at {report['root']}",
             f"  records: {report['records']}   images referenced: {report['images']}"
             + ("" if report["image_files"] is None else f" of {report['image_files']} files")
             + f"   annotation rows: {report['annotation_rows']}   patients: {report['patients']}",
             "  splits: " + _inline(report["splits"])]
    regions = report["regions"]
    if regions["total"]:
        lines.append(f"  regions: {regions['total']} (boxes {regions['boxes']}, circles {regions['circles']}, "
                     f"masks {regions['masks']}); by label: {_inline(regions['labels'])}")
    if report["labels"]:
        lines.append("  labels (positive / negative / unknown):")
        lines += [f"    {name}: {c['positive']} / {c['negative']} / {c['unknown']}"
                  for name, c in report["labels"].items()]
    for key, title in (("answer_types", "answer types"), ("question_types", "question types"),
                       ("modalities", "modalities"), ("tasks", "tasks")):
        if report[key]:
            lines.append(f"  {title}: {_inline(report[key])}")
    lines += _listing("images referenced but missing", report["missing_images"])
    lines += _listing("image files never referenced", report["unreferenced_images"])
    lines += _listing("duplicate records", [_group_text(group) for group in report["duplicates"]])
    lines += _listing("train/test leakage", [_group_text(group) for group in report["leakage"]])
    lines += _listing("malformed records", [
        f"{p['file']}" + ("" if p["record"] is None else f": record {p['record']}") + f": {p['message']}"
        for p in report["problems"]])
    verdict = "no problems" if not report["problem_count"] else f"{report['problem_count']} problem(s)"
    lines.append(f"  {verdict}")
    return "\n".join(lines)


def _count(values: Iterable[str | None]) -> dict[str, int]:
    counts = Counter(value for value in values if value is not None)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _label_counts(records: list[Record]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        for name, value in record.labels.items():
            kind = "unknown" if math.isnan(value) else "positive" if value > 0 else "negative"
            counts[name][kind] += 1
    return {name: {kind: counts[name][kind] for kind in ("positive", "negative", "unknown")}
            for name in sorted(counts)}


def _region_counts(records: list[Record]) -> dict[str, Any]:
    regions = [region for record in records for region in record.regions]
    return {"total": len(regions),
            "boxes": sum(region.box is not None for region in regions),
            "circles": sum(region.circle is not None for region in regions),
            "masks": sum(region.mask is not None for region in regions),
            "labels": _count(region.label for region in regions)}


def _referenced_files(records: list[Record]) -> set[str]:
    """Images and masks (which must exist); other files a record names in `meta["files"]` (a
    CBIS-DDSM cropped image) only count as referenced."""
    files = {record.image for record in records if record.image}
    files |= {region.mask for record in records for region in record.regions if region.mask}
    return files


def _image_files(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {str(path) for path in folder.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()}


def _relative(path: str, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def _normalise(text: str | None) -> str:
    """Lower case, collapsed spaces, no final period (the exact-match convention of Med-VQA)."""
    return " ".join((text or "").lower().split()).rstrip(".")


def _duplicates_and_leakage(records: list[Record]) -> tuple[list[dict], list[dict]]:
    """Duplicates: the same key twice within a split. Leakage: the same key in several splits. The key is
    (image, question, answer) for VQA, the image for image-level records; records that share an image
    by design (several abnormalities of one image) are told apart by their uid."""
    by_key: dict[tuple, list[Record]] = defaultdict(list)
    for record in records:
        if record.question is not None:
            key: tuple = ("qa", record.image, _normalise(record.question), _normalise(record.answer))
        elif record.image is not None:
            key = ("image", record.image)
        else:
            key = ("uid", record.uid)
        by_key[key].append(record)
    duplicates, leakage = [], []
    for key, group in by_key.items():
        splits = sorted({record.split for record in group})
        if len(splits) > 1:
            leakage.append(_group(key, group, splits))
        for split in splits:
            same = [record for record in group if record.split == split]
            uids = Counter(record.uid for record in same)
            if key[0] == "qa" and len(same) > 1 or any(count > 1 for count in uids.values()):
                duplicates.append(_group(key, same, [split]))
    return duplicates, leakage


def _group(key: tuple, records: list[Record], splits: list[str]) -> dict:
    group = {"kind": key[0], "image": Path(key[1]).name if key[1] else None, "splits": splits,
             "records": [record.uid for record in records]}
    if key[0] == "qa":
        group.update(question=records[0].question, answer=records[0].answer)
    return group


def _group_text(group: dict) -> str:
    what = f"{group['image']}" + (f" Q: {group['question']!r} A: {group['answer']!r}" if group["kind"] == "qa"
                                  else "")
    return f"{what} in {', '.join(group['splits'])}: {', '.join(group['records'])}"


def _problem_dict(problem: Problem, base: Path) -> dict:
    return {"file": _relative(problem.file, base) if problem.file else "", "record": problem.record,
            "message": problem.message}


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title}: {len(items)}"]
    lines += [f"    {item}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        lines.append(f"    ... and {len(items) - _LIST_LIMIT} more (--json lists all)")
    return lines


def _inline(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"
