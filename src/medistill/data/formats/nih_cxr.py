"""NIH ChestX-ray14 (Wang et al. 2017): `Data_Entry_2017.csv`, `BBox_List_2017.csv` and the PNGs.

Both CSV headers split their bracketed column names on commas ("OriginalImage[Width,Height]",
"Bbox [x,y,w,h],,,"), so the cells are read by position. The table spells "Infiltration", the box file
"Infiltrate": both become "Infiltration". Images are found in `images/` or in the release's
`images_NNN/images/` folders; `train_val_list.txt` / `test_list.txt` give the official split when present.

Option `task`: "labels" (default, one record per image) or "grounding": one visual-grounding (VG)
conversation per boxed finding of an image, in Med-GRIT's form ("Please locate the effusion in the image." ->
"<ref>effusion</ref><box>(x1,y1),(x2,y2)</box>" on the 0-1000 grid, every box of that finding), for ClinKD.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import At, Row, make_box, read_text
from medistill.data.records import Box, Region, Record, Turn

ENTRY_FILE = "Data_Entry_2017.csv"
BOX_FILE = "BBox_List_2017.csv"
IMAGE_SIZE = 1024  # the released PNGs are all 1024 x 1024; boxes are in their pixels
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
            "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
SYNONYMS = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}
ENTRY_COLUMNS = ("image_index", "finding_labels", "follow_up", "patient_id", "patient_age", "patient_gender",
                 "view_position", "original_width", "original_height", "spacing_x", "spacing_y")
BOX_COLUMNS = ("image_index", "finding_label", "x", "y", "w", "h")
SPLIT_FILES = (("train_val_list.txt", "train"), ("test_list.txt", "test"))
GRID = 1000  # Med-GRIT's box coordinates


def finding(name: str, at: At, field: str) -> str:
    canonical = SYNONYMS.get(name.strip(), name.strip())
    if canonical not in FINDINGS:
        raise at.error(f"unknown finding {name!r}; expected one of {', '.join(FINDINGS)} or 'No Finding'",
                       field=field)
    return canonical


@register_format
class NihCxrReader(Reader):
    name = "nih-cxr"
    description = "NIH ChestX-ray14: Data_Entry_2017.csv + BBox_List_2017.csv + PNGs"

    def referenced_image_dir(self) -> Path:
        return self.root / "images"

    def _read(self) -> Iterator[Record]:
        grounding = self.option("task", "labels", ("labels", "grounding")) == "grounding"
        for record in self._labelled():
            yield from grounding_records(record) if grounding else [record]

    def _labelled(self) -> Iterator[Record]:
        boxes: dict[str, list[Region]] = defaultdict(list)
        broken: set[str] = set()  # an image with a bad box row is skipped whole, never half-annotated
        if (self.root / BOX_FILE).exists():
            for row in self.csv_rows(self.root / BOX_FILE, columns=BOX_COLUMNS):
                region = self.attempt(self._box, row)
                if region is None:
                    broken.add(row.get("image_index") or "")
                else:
                    boxes[row.require("image_index")].append(region)
        splits = self._splits()
        images = self._image_index()
        seen: set[str] = set()
        for row in self.csv_rows(self.root / ENTRY_FILE, columns=ENTRY_COLUMNS):
            name = row.get("image_index") or ""
            seen.add(name)
            if name in broken:
                continue
            record = self.attempt(self._record, row, boxes.get(name, []), splits, images)
            if record is not None:
                yield record
        for name in sorted(set(boxes) - seen):
            self.fail(At(str(self.root / BOX_FILE)).error(f"boxes for {name}, which {ENTRY_FILE} does not list",
                                                          field="Image Index"))

    @staticmethod
    def _box(row: Row) -> Region:
        label = finding(row.require("finding_label"), row.at, "Finding Label")
        x, y, w, h = (row.number(name) or 0.0 for name in ("x", "y", "w", "h"))
        box = make_box(x, y, x + w, y + h, row.at, "Bbox [x,y,w,h]", size=(IMAGE_SIZE, IMAGE_SIZE))
        return Region(label, box=box)

    def _record(self, row: Row, regions: list[Region], splits: dict[str, str], images: dict[str, Path]
                ) -> Record:
        name = row.require("image_index")
        findings = {finding(label, row.at, "Finding Labels")
                    for label in row.require("finding_labels").split("|") if label.strip() != "No Finding"}
        age = row.get("patient_age")
        return Record(
            uid=Path(name).stem,
            image=str(images.get(name, self.root / "images" / name)),
            split=splits.get(name, "train"),
            patient_id=row.require("patient_id"),
            modality="x_ray",
            view=row.get("view_position"),
            image_size=(IMAGE_SIZE, IMAGE_SIZE),
            labels={label: float(label in findings) for label in FINDINGS},
            regions=regions,
            table={"age": _age(age, row.at) if age else None, "sex": row.get("patient_gender"),
                   "view": row.get("view_position")},
            meta={"follow_up": row.get("follow_up"),
                  "original_size": (row.get("original_width"), row.get("original_height"))},
        )

    def _splits(self) -> dict[str, str]:
        splits = {}
        for file_name, split in SPLIT_FILES:
            if (self.root / file_name).exists():
                text = self.attempt(read_text, self.root / file_name) or ""
                splits.update({line.strip(): split for line in text.splitlines() if line.strip()})
        return splits

    def _image_index(self) -> dict[str, Path]:
        """Image files in `images/` and in the release's `images_NNN/images/` folders, by file name."""
        folders = [self.root / "images", *sorted(self.root.glob("images_*/images"))]
        return {path.name: path for folder in folders if folder.is_dir() for path in folder.iterdir()}


def _age(value: str, at: At) -> int:
    """'58' or the first release's '058Y'."""
    match = re.fullmatch(r"(\d{1,3})\s*Y?", value.strip(), re.IGNORECASE)
    if not match:
        raise at.error(f"expected an age in years, found {value!r}", field="Patient Age")
    return int(match.group(1))


def _grid(box: Box, size: tuple[int, int]) -> str:
    """A pixel box as Med-GRIT's `(x1,y1),(x2,y2)` on the 0-1000 grid (corners clamped to 0..999)."""
    width, height = size
    x1, x2 = (min(GRID - 1, max(0, round(v / width * GRID))) for v in (box.x1, box.x2))
    y1, y2 = (min(GRID - 1, max(0, round(v / height * GRID))) for v in (box.y1, box.y2))
    return f"({x1},{y1}),({x2},{y2})"


def grounding_records(record: Record) -> list[Record]:
    """One VG conversation per boxed finding of `record` (all of that finding's boxes in the answer)."""
    by_label: dict[str, list[Region]] = defaultdict(list)
    for region in record.regions:
        if region.box is not None:
            by_label[region.label].append(region)
    size = record.image_size or (IMAGE_SIZE, IMAGE_SIZE)
    out = []
    for label, regions in sorted(by_label.items()):
        phrase = label.replace("_", " ").lower()
        answer = f"<ref>{phrase}</ref>" + "".join(f"<box>{_grid(r.box, size)}</box>" for r in regions)  # type: ignore[arg-type]
        out.append(replace(record, uid=f"{record.uid}/vg/{label}", regions=regions, labels={}, task="VG",
                           conversations=[Turn(f"Please locate the {phrase} in the image.", answer)]))
    return out
