"""CBIS-DDSM (Lee et al. 2017): mass and calcification case-description CSVs, full mammograms and ROI
masks (DICOM in the release; PNG or JPEG copies accepted by extension).

One record per abnormality row: the full mammogram as image, the ROI mask as a region, pathology as
label (MALIGNANT -> 1; BENIGN and BENIGN_WITHOUT_CALLBACK -> 0) and the descriptors as the table row.
Header spellings differ between files ('breast_density' / 'breast density'); paths in the CSVs carry
stray whitespace and newlines, and a TCIA download renames the folders below each case folder: a path
that does not exist as written is looked up by its case folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import At, Row, inside, to_float, with_image_suffix
from medistill.data.imaging import IMAGE_SUFFIXES
from medistill.data.records import Region, Record

PATHOLOGIES = {"MALIGNANT": 1.0, "BENIGN": 0.0, "BENIGN_WITHOUT_CALLBACK": 0.0}
REQUIRED = ("patient_id", "left_or_right_breast", "image_view", "abnormality_id", "pathology",
            "image_file_path", "roi_mask_file_path")
DESCRIPTORS = ("breast_density", "abnormality_type", "mass_shape", "mass_margins", "calc_type",
               "calc_distribution", "assessment", "subtlety")
NUMERIC = ("breast_density", "assessment", "subtlety")
_FILE = re.compile(r"(mass|calc)_case_description_(train|test)_set\.csv$", re.IGNORECASE)


@register_format
class CbisDdsmReader(Reader):
    name = "cbis-ddsm"
    description = "CBIS-DDSM case-description CSVs + full mammograms + ROI masks"

    def referenced_image_dir(self) -> Path:
        return self.root

    def _read(self) -> Iterator[Record]:
        files = sorted(path for path in self.root.iterdir() if _FILE.search(path.name))
        if not files:
            self.fail(At(str(self.root)).error("no *_case_description_{train,test}_set.csv file"))
        for path in files:
            split = _FILE.search(path.name).group(2).lower()  # type: ignore[union-attr]
            for row in self.csv_rows(path, required=REQUIRED):
                record = self.attempt(self._record, row, split)
                if record is not None:
                    yield record

    def _record(self, row: Row, split: str) -> Record:
        pathology = row.require("pathology").upper()
        if pathology not in PATHOLOGIES:
            raise row.at.error(f"unknown pathology {pathology!r}; expected one of {', '.join(PATHOLOGIES)}",
                               field="pathology")
        image = self._resolve(row, "image_file_path", "full mammogram")
        mask = self._resolve(row, "roi_mask_file_path", "mask")
        cropped = self._resolve(row, "cropped_image_file_path", "cropped") if row.get("cropped_image_file_path") \
            else None
        case = image.relative_to(self.root).parts[0] if image.is_relative_to(self.root) else image.parent.name
        table: dict[str, object] = {name: row.get(name) for name in DESCRIPTORS}
        for name in NUMERIC:
            if table[name] is not None:
                table[name] = to_float(table[name], row.at, name)
        return Record(
            uid=f"{case}_{row.require('abnormality_id')}",
            image=str(image),
            split=split,
            patient_id=row.require("patient_id"),
            modality="mammography",
            view=row.require("image_view").upper(),
            labels={"malignant": PATHOLOGIES[pathology]},
            regions=[Region(row.get("abnormality_type") or "abnormality", mask=str(mask),
                            attributes={"pathology": pathology})],
            table={"laterality": row.require("left_or_right_breast").upper(), **table},
            meta={"pathology": pathology, "files": [str(cropped)] if cropped else []},
        )

    def _resolve(self, row: Row, column: str, series: str) -> Path:
        """The file a CSV path names: as written; with another image extension; under `CBIS-DDSM/`; or,
        for a TCIA download, the one file under its case folder whose series folder names `series`."""
        written = inside(self.root, row.require(column), row.at, column)
        relative = written.relative_to(self.root)
        for base in (self.root, self.root / "CBIS-DDSM"):
            candidate = with_image_suffix((base / relative).with_suffix(""), (written.suffix, *IMAGE_SUFFIXES))
            if candidate.exists():
                return candidate
            case = base / relative.parts[0]
            if case.is_dir():
                found = [path for path in case.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES
                         and (series in path.parent.name.lower() or series == "full mammogram")]
                if len(found) == 1:
                    return found[0]
        return written
