"""PathVQA (He et al. 2020): `qas/{split}/{split}_qa.pkl` (a pickled list of
`{"image": "train_0422", "question", "answer"}`) or the JSON variant `qas/{split}/{split}_qa.json` /
`{split}.json`, with images `images/{split}/<image>.jpg` (or .png).

Pickles are read with an unpickler that builds plain lists and dicts only, so a pickle cannot run code.
PathVQA has no answer type: yes / no answers are CLOSED, the rest OPEN.
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
    first_key,
    inside,
    read_json_list,
    read_pickle_list,
    text_field,
    with_image_suffix,
)
from medistill.data.records import Record

SPLITS = (("train", "train"), ("val", "val"), ("test", "test"))
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


@register_format
class PathVqaReader(Reader):
    name = "pathvqa"
    description = "PathVQA: qas/{split}/{split}_qa.pkl or .json + images/{split}/"

    def referenced_image_dir(self) -> Path:
        return self.root / "images"

    def _annotation_file(self, split: str) -> Path | None:
        candidates = (self.root / "qas" / split / f"{split}_qa.pkl", self.root / "qas" / split / f"{split}_qa.json",
                      self.root / f"{split}.json")
        return next((path for path in candidates if path.exists()), None)

    def _read(self) -> Iterator[Record]:
        for folder, split in SPLITS:
            path = self._annotation_file(folder)
            if path is None:
                continue
            load = read_pickle_list if path.suffix == ".pkl" else read_json_list
            for number, item in enumerate(self.attempt(load, path) or [], start=1):
                record = self.attempt(self._record, item, At(str(path), number), folder, split)
                if record is not None:
                    yield record

    def _record(self, item: Any, at: At, folder: str, split: str) -> Record:
        item = as_object(item, at)
        name = text_field(item, first_key(item, ("image", "img_id", "image_name")), at, numbers=True) or ""
        answer = text_field(item, "answer", at, numbers=True) or ""
        stem = inside(self.referenced_image_dir() / folder, name, at, "image")
        image = stem if stem.suffix.lower() in IMAGE_SUFFIXES else with_image_suffix(stem, IMAGE_SUFFIXES)
        return Record(
            uid=f"pathvqa/{split}/{at.record}",
            image=str(image),
            split=split,
            modality="pathology",
            question=text_field(item, "question", at),
            answer=answer,
            answer_type=answer_type(text_field(item, "answer_type", at, required=False), answer, at),
        )
