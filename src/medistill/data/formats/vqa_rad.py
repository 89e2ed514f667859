"""VQA-RAD (Lau et al. 2018): the official release and the MEVF re-packaging.

Official: `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`, split by `phrase_type`
(freeform, para -> train; test_freeform, test_para -> test). MEVF: `trainset.json` / `testset.json` +
`images/`, split by file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import At, answer_type, as_object, inside, read_json_list, text_field
from medistill.data.records import Record

OFFICIAL_JSON = "VQA_RAD Dataset Public.json"
OFFICIAL_IMAGES = "VQA_RAD Image Folder"
MEVF_FILES = (("trainset.json", "train"), ("testset.json", "test"))
PHRASE_SPLITS = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}


@register_format
class VqaRadReader(Reader):
    name = "vqa-rad"
    description = "VQA-RAD, official release or MEVF layout"

    def _files(self) -> list[tuple[Path, str | None]]:
        if (self.root / OFFICIAL_JSON).exists() or not (self.root / MEVF_FILES[0][0]).exists():
            return [(self.root / OFFICIAL_JSON, None)]
        return [(self.root / name, split) for name, split in MEVF_FILES if (self.root / name).exists()]

    def referenced_image_dir(self) -> Path:
        official = self._files()[0][1] is None
        return self.root / (OFFICIAL_IMAGES if official else "images")

    def _read(self) -> Iterator[Record]:
        images = self.referenced_image_dir()
        for path, split in self._files():
            for number, item in enumerate(self.attempt(read_json_list, path) or [], start=1):
                record = self.attempt(self._record, item, At(str(path), number), images, split)
                if record is not None:
                    yield record

    @staticmethod
    def _record(item: Any, at: At, images: Path, split: str | None) -> Record:
        item = as_object(item, at)
        qid = text_field(item, "qid", at, numbers=True)
        phrase = text_field(item, "phrase_type", at, required=split is None)
        if split is None:
            split = PHRASE_SPLITS.get(phrase or "")
            if split is None:
                raise at.error(f"unknown phrase_type {phrase!r}; expected one of {', '.join(PHRASE_SPLITS)}",
                               field="phrase_type")
        answer = text_field(item, "answer", at, numbers=True)
        question_type = text_field(item, "question_type", at, required=False)
        return Record(
            uid=f"vqa-rad/{qid}",
            image=str(inside(images, text_field(item, "image_name", at), at, "image_name")),
            split=split,
            question=text_field(item, "question", at),
            answer=answer,
            answer_type=answer_type(text_field(item, "answer_type", at, required=False), answer, at),
            question_type=question_type.upper() if question_type else None,
            meta={"organ": text_field(item, "image_organ", at, required=False), "phrase_type": phrase,
                  "qid_linked_id": text_field(item, "qid_linked_id", at, required=False)},
        )
