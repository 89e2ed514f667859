"""mini-MIAS (Suckling et al. 1994): `Info.txt` + `mdbNNN.pgm` (or `.png`), 1024 x 1024 mammograms.

`Info.txt` has a free-text header, then rows `REFNUM BG CLASS [SEVERITY [X Y RADIUS]]`; an image can
have several rows (several abnormalities), some rows have no coordinates (widely spread
calcifications, marked `*NOTE 3*` or left blank), and the coordinate origin is the bottom-left corner.
Each image becomes one record whose abnormalities are circle regions in top-left pixel coordinates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import At, read_text, to_float, with_image_suffix
from medistill.data.records import Circle, Region, Record

INFO_FILE = "Info.txt"
IMAGE_SIZE = 1024  # every mini-MIAS image is 1024 x 1024 (Info.txt, note 2)
BACKGROUNDS = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
CLASSES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM")
SEVERITIES = ("B", "M")
_ROW = re.compile(r"^\s*(mdb\d{3})\b(.*)$", re.IGNORECASE)


@dataclass
class _Image:
    refnum: str
    background: str
    rows: int = 0
    regions: list[Region] = field(default_factory=list)


@register_format
class MiniMiasReader(Reader):
    name = "mini-mias"
    description = "mini-MIAS mammograms: Info.txt + mdbNNN.pgm/.png"

    def referenced_image_dir(self) -> Path:
        return self.root

    def _read(self) -> Iterator[Record]:
        path = self.root / INFO_FILE
        text = self.attempt(read_text, path)
        images: dict[str, _Image] = {}
        broken: set[str] = set()  # an image with a bad row is skipped whole, never half-annotated
        for number, line in enumerate((text or "").splitlines(), start=1):
            match = _ROW.match(line)
            if match and not self.attempt(self._add_row, images, match.group(1).lower(),
                                          match.group(2).split(), At(str(path), number)):
                broken.add(match.group(1).lower())
        for refnum, image in images.items():
            if refnum not in broken:
                yield self._record(image)

    @staticmethod
    def _add_row(images: dict[str, _Image], refnum: str, tokens: list[str], at: At) -> bool:
        if len(tokens) < 2:
            raise at.error("short row: expected REFNUM BG CLASS [SEVERITY X Y RADIUS]", field="CLASS")
        background, kind = tokens[0].upper(), tokens[1].upper()
        if background not in BACKGROUNDS:
            raise at.error(f"unknown background tissue {tokens[0]!r}; expected F, G or D", field="BG")
        if kind not in CLASSES:
            raise at.error(f"unknown abnormality class {tokens[1]!r}; expected one of {', '.join(CLASSES)}",
                           field="CLASS")
        region = None
        if kind != "NORM":
            region = _region(kind, tokens[2:], at)
        image = images.setdefault(refnum, _Image(refnum, background))
        image.rows += 1
        if region is not None:
            image.regions.append(region)
        return True

    def _record(self, image: _Image) -> Record:
        number = int(image.refnum[3:])
        severities = [region.attributes.get("severity") for region in image.regions]
        malignant = math.nan if not image.regions else float("M" in severities)
        return Record(
            uid=image.refnum,
            image=str(with_image_suffix(self.root / image.refnum, (".pgm", ".png"))),
            patient_id=f"mias-{(number + 1) // 2:03d}",
            modality="mammography",
            view="MLO",
            image_size=(IMAGE_SIZE, IMAGE_SIZE),
            labels={"abnormal": float(bool(image.regions)), "malignant": malignant},
            regions=image.regions,
            table={"background": BACKGROUNDS[image.background],
                   "class": ",".join(sorted({region.label for region in image.regions})) or "NORM"},
            meta={"laterality": "L" if number % 2 == 0 else "R", "source_rows": image.rows},
        )


def _region(kind: str, tokens: list[str], at: At) -> Region:
    if not tokens or tokens[0].upper() not in SEVERITIES:
        raise at.error(f"{kind} row without severity B or M", field="SEVERITY")
    attributes = {"severity": tokens[0].upper()}
    rest = tokens[1:]
    if not rest or rest[0].startswith("*"):  # no coordinates, or a reference to the header's note
        return Region(kind, attributes={**attributes, "note": " ".join(rest) or None})
    if len(rest) != 3:
        raise at.error(f"expected X Y RADIUS, found {' '.join(rest)!r}", field="X")
    x, y, radius = (to_float(value, at, name) for value, name in zip(rest, ("X", "Y", "RADIUS")))
    if not (0 <= x <= IMAGE_SIZE and 0 <= y <= IMAGE_SIZE and 0 < radius <= IMAGE_SIZE):
        raise at.error(f"circle ({x:g}, {y:g}, r={radius:g}) outside the {IMAGE_SIZE}x{IMAGE_SIZE} image",
                       field="X")
    return Region(kind, circle=Circle(x, IMAGE_SIZE - y, radius), attributes=attributes)
