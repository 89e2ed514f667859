"""MIMIC-CXR-JPG (Johnson et al. 2019) with the MIMIC-CXR report texts and optional MS-CXR boxes.

Layout: `mimic-cxr-2.0.0-metadata.csv`, `-split.csv` and `-chexpert.csv` or `-negbio.csv` (each may be
gzipped), images `files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg` (.png and .dcm accepted), reports
`files/pNN/pSUBJECT/sSTUDY.txt` (also under `mimic-cxr-reports/`), MS-CXR boxes in `ms-cxr-boxes.csv` or
`MS_CXR_Local_Alignment_v1.0.0.csv`. Options: `labeler` (chexpert | negbio), `uncertain` (what -1 becomes:
ignore -> NaN, ones -> 1, zeros -> 0), `reports` (read report texts, default True).
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import At, Row, find_file, make_box, read_text, with_image_suffix
from medistill.data.records import Region, Record

log = logging.getLogger(__name__)

PREFIX = "mimic-cxr-2.0.0"
BOX_FILES = ("ms-cxr-boxes.csv", "MS_CXR_Local_Alignment_v1.0.0.csv")
IMAGE_SUFFIXES = (".jpg", ".png", ".dcm")
UNCERTAIN = {"ignore": math.nan, "ones": 1.0, "zeros": 0.0}
SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
ID_COLUMNS = ("subject_id", "study_id")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEADING = re.compile(r"^\s*([A-Z][A-Z /&()-]*[A-Z)])\s*:", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """The report's sections by upper-case heading ('FINDINGS', 'IMPRESSION', ...), text stripped."""
    matches = list(_HEADING.finditer(text))
    sections = {}
    for match, following in zip(matches, [*matches[1:], None]):
        body = text[match.end():following.start() if following else len(text)]
        sections[match.group(1).strip()] = " ".join(body.split())
    return sections


@register_format
class MimicCxrReader(Reader):
    name = "mimic-cxr"
    description = "MIMIC-CXR-JPG metadata + CheXpert/NegBio labels + reports + MS-CXR boxes"

    def referenced_image_dir(self) -> Path:
        return self.root / "files"

    def _read(self) -> Iterator[Record]:
        labeler = self.option("labeler", "chexpert", ("chexpert", "negbio"))
        uncertain = UNCERTAIN[self.option("uncertain", "ignore", tuple(UNCERTAIN))]
        labels = self._labels(find_file(self.root, f"{PREFIX}-{labeler}.csv"), uncertain)
        splits = self._splits()
        boxes, sizes = self._boxes()
        reports: dict[tuple[str, str], tuple[str | None, dict[str, str]]] = {}
        for row in self.csv_rows(find_file(self.root, f"{PREFIX}-metadata.csv"),
                                 required=("dicom_id", *ID_COLUMNS)):
            record = self.attempt(self._record, row, labels, splits, boxes, sizes, reports)
            if record is not None:
                yield record

    def _record(self, row: Row, labels: dict[tuple[str, str], dict[str, float]], splits: dict[str, str],
                boxes: dict[str, list[Region]], sizes: dict[str, tuple[int, int]],
                reports: dict[tuple[str, str], tuple[str | None, dict[str, str]]]) -> Record:
        dicom_id, subject, study = (row.require(name) for name in ("dicom_id", *ID_COLUMNS))
        for name, value in (("subject_id", subject), ("study_id", study)):
            if not value.isdigit():
                raise row.at.error(f"expected a numeric id, found {value!r}", field=name)
        if not _SAFE_ID.fullmatch(dicom_id):
            raise row.at.error(f"unexpected characters in {dicom_id!r}", field="dicom_id")
        folder = self.root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        key = (subject, study)
        if key not in reports:
            reports[key] = self._report(folder.with_suffix(".txt"))
        report, sections = reports[key]
        if splits and dicom_id not in splits:
            raise row.at.error(f"image {dicom_id} is not in the split file", field="dicom_id")
        width, height = row.number("columns", required=False), row.number("rows", required=False)
        size = sizes.get(dicom_id) or ((int(width), int(height)) if width and height else None)
        return Record(
            uid=dicom_id,
            image=str(with_image_suffix(folder / dicom_id, IMAGE_SUFFIXES)),
            split=splits.get(dicom_id, "train"),
            study_id=study,
            patient_id=subject,
            modality="x_ray",
            view=row.get("viewposition"),
            image_size=size,
            labels=dict(labels.get(key, {})),
            regions=boxes.get(dicom_id, []),
            report=report,
            meta={"findings": sections.get("FINDINGS"), "impression": sections.get("IMPRESSION")},
        )

    def _labels(self, path: Path, uncertain: float) -> dict[tuple[str, str], dict[str, float]]:
        values = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": uncertain, "-1.0": uncertain}
        labels: dict[tuple[str, str], dict[str, float]] = {}
        for row in self.csv_rows(path, required=ID_COLUMNS):
            study_labels = self.attempt(_label_row, row, values)
            if study_labels is not None:
                labels[(row.require("subject_id"), row.require("study_id"))] = study_labels
        return labels

    def _splits(self) -> dict[str, str]:
        path = find_file(self.root, f"{PREFIX}-split.csv")
        if not path.exists():
            log.warning("%s: no split file; every image is 'train'", self.root)
            return {}
        splits = {}
        for row in self.csv_rows(path, required=("dicom_id", "split")):
            split = SPLITS.get(row.get("split", "") or "")
            if split is None:
                self.fail(row.at.error(f"unknown split {row.get('split')!r}", field="split"))
            else:
                splits[row.get("dicom_id") or ""] = split
        return splits

    def _boxes(self) -> tuple[dict[str, list[Region]], dict[str, tuple[int, int]]]:
        boxes: dict[str, list[Region]] = defaultdict(list)
        sizes: dict[str, tuple[int, int]] = {}
        path = next((self.root / name for name in BOX_FILES if (self.root / name).exists()), None)
        for row in self.csv_rows(path, required=("dicom_id", "x", "y", "w", "h")) if path else []:
            region = self.attempt(_box, row)
            if region is not None:
                boxes[row.require("dicom_id")].append(region[0])
                if region[1]:
                    sizes[row.require("dicom_id")] = region[1]
        return boxes, sizes

    def _report(self, path: Path) -> tuple[str | None, dict[str, str]]:
        if not self.option("reports", True):
            return None, {}
        for candidate in (path, self.root / "mimic-cxr-reports" / path.relative_to(self.root)):
            if candidate.exists():
                text = read_text(candidate)
                sections = report_sections(text)
                chosen = [f"{name}: {sections[name]}" for name in ("FINDINGS", "IMPRESSION") if sections.get(name)]
                return ("\n".join(chosen) or " ".join(text.split()) or None), sections
        return None, {}


def _box(row: Row) -> tuple[Region, tuple[int, int] | None]:
    x, y, w, h = (row.number(name) or 0.0 for name in ("x", "y", "w", "h"))
    width, height = row.number("image_width", required=False), row.number("image_height", required=False)
    size = (int(width), int(height)) if width and height else None
    box = make_box(x, y, x + w, y + h, row.at, "x,y,w,h", size=size)
    label = row.get("category_name") or "finding"
    return Region(label, box=box, attributes={"text": row.get("label_text")}), size


def _label_row(row: Row, values: dict[str, float]) -> dict[str, float]:
    return {_title(name): _label(values, cell, row.at, name)
            for name, cell in row.cells.items() if name not in ID_COLUMNS}


def _label(values: dict[str, float], cell: str, at: At, column: str) -> float:
    text = cell.strip()
    if not text:
        return math.nan
    if text not in values:
        raise at.error(f"expected 1, 0, -1 or blank, found {text!r}", field=column)
    return values[text]


def _title(column: str) -> str:
    """'pleural_effusion' -> 'Pleural Effusion' (the CheXpert spelling; headers arrive normalised)."""
    return " ".join(part.capitalize() for part in column.split("_"))

