"""SLAKE 1.0 (Liu et al. 2021): `{train,validate,test}.json` + `imgs/xmlabN/{source.jpg,mask.png,
detection.json}`, with the files directly under the root or under `Slake1.0/`.

English and Chinese questions share the files; `q_lang` (option, default "en"; "all" keeps both) picks
them. The segmentation mask and the detection boxes (`[{"Liver": [x, y, w, h]}, ...]`) become regions
when present.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import (
    At,
    answer_type,
    as_object,
    inside,
    make_box,
    read_json_list,
    text_field,
    to_float,
)
from medistill.data.records import Region, Record

SPLIT_FILES = (("train.json", "train"), ("validate.json", "val"), ("test.json", "test"))


@register_format
class SlakeReader(Reader):
    name = "slake"
    description = "SLAKE 1.0: {train,validate,test}.json + imgs/"

    @property
    def _base(self) -> Path:
        nested = self.root / "Slake1.0"
        return nested if nested.is_dir() else self.root

    def referenced_image_dir(self) -> Path:
        return self._base / "imgs"

    def _read(self) -> Iterator[Record]:
        language = self.option("q_lang", "en", ("en", "zh", "all"))
        regions: dict[Path, list[Region]] = {}
        for file_name, split in SPLIT_FILES:
            path = self._base / file_name
            if not path.exists():
                continue
            for number, item in enumerate(self.attempt(read_json_list, path) or [], start=1):
                record = self.attempt(self._record, item, At(str(path), number), split, language, regions)
                if record is not None:
                    yield record

    def _record(self, item: Any, at: At, split: str, language: str, regions: dict[Path, list[Region]]
                ) -> Record | None:
        item = as_object(item, at)
        lang = text_field(item, "q_lang", at, required=False) or "en"
        if language != "all" and lang != language:
            return None
        image = inside(self.referenced_image_dir(), text_field(item, "img_name", at), at, "img_name")
        if image.parent not in regions:
            regions[image.parent] = _regions(image.parent)
        answer = text_field(item, "answer", at, numbers=True)
        return Record(
            uid=f"slake/{text_field(item, 'qid', at, numbers=True)}",
            image=str(image),
            split=split,
            modality=text_field(item, "modality", at, required=False),
            regions=regions[image.parent],
            question=text_field(item, "question", at),
            answer=answer,
            answer_type=answer_type(text_field(item, "answer_type", at, required=False), answer or "", at),
            question_type=text_field(item, "content_type", at, required=False),
            meta={"language": lang, "location": text_field(item, "location", at, required=False),
                  "base_type": text_field(item, "base_type", at, required=False)},
        )


def _regions(folder: Path) -> list[Region]:
    regions = []
    if (folder / "mask.png").exists():
        regions.append(Region("segmentation", mask=str(folder / "mask.png")))
    detection = folder / "detection.json"
    if detection.exists():
        for number, entry in enumerate(read_json_list(detection), start=1):
            at = At(str(detection), number)
            for label, value in as_object(entry, at).items():
                if not isinstance(value, list) or len(value) != 4:
                    raise at.error("expected [x, y, w, h]", field=label)
                x, y, w, h = (to_float(number_, at, label) for number_ in value)
                regions.append(Region(label, box=make_box(x, y, x + w, y + h, at, label)))
    return regions
