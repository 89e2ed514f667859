"""ImageCLEF VQA-Med 2019 (Ben Abacha et al. 2019).

Each split sits in its own folder under the root (the release's `ImageClef-2019-VQA-Med-Training/`,
`-Validation/`, `VQAMed2019Test/`), which holds its `<ImageID>.jpg` images somewhere below it. Train and
validation: `All_QA_Pairs_{train,val}.txt` (`ImageID|question|answer`) and the per-category files
`QAPairsByCategory/C1_Modality_train.txt` ... `C4_Abnormality_train.txt`, which give each pair its category
(when only those exist, they are the list). Test: `ImageID|category|question|answer`, with alternative
answers separated by `#` (the first is `answer`, all are in `meta["answers"]`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import At, answer_type, read_delimited
from medistill.data.records import Record

CATEGORIES = ("modality", "plane", "organ", "abnormality")
_CATEGORY_FILE = re.compile(r"^C\d_(modality|plane|organ|abnormality)_(train|val)\w*\.txt$", re.IGNORECASE)
_ALL_FILE = re.compile(r"^All_QA_Pairs_(train|val)\w*\.txt$", re.IGNORECASE)
_TEST_FILE = re.compile(r"test.*\.txt$", re.IGNORECASE)


@register_format
class VqaMed2019Reader(Reader):
    name = "vqa-med-2019"
    description = "ImageCLEF VQA-Med 2019: ImageID|question|answer text files + <ImageID>.jpg"

    def referenced_image_dir(self) -> Path:
        return self.root

    def _read(self) -> Iterator[Record]:
        files = sorted(self.root.rglob("*.txt"))
        categories: dict[tuple[str, str, str], str] = {}
        for path in files:
            match = _CATEGORY_FILE.match(path.name)
            for _, cells in (self.attempt(read_delimited, path) or []) if match else []:
                if len(cells) >= 2:
                    categories[(match.group(2).lower(), cells[0], cells[1])] = match.group(1).lower()
        images: dict[Path, dict[str, Path]] = {}
        for split in ("train", "val", "test"):
            for source in _sources(files, split):
                folder = self._split_folder(source)
                if folder not in images:
                    images[folder] = {image.stem: image for image in folder.rglob("*.jpg")}
                for at, cells in self.attempt(read_delimited, source) or []:
                    record = self.attempt(self._record, at, cells, split, categories, images[folder], folder)
                    if record is not None:
                        yield record

    def _split_folder(self, path: Path) -> Path:
        relative = path.relative_to(self.root)
        return self.root / relative.parts[0] if len(relative.parts) > 1 else self.root

    @staticmethod
    def _record(at: At, cells: list[str], split: str, categories: dict[tuple[str, str, str], str],
                images: dict[str, Path], folder: Path) -> Record:
        if split == "test":
            if len(cells) != 4:
                raise at.error(f"expected ImageID|category|question|answer, found {len(cells)} fields",
                               field="answer" if len(cells) == 3 else None)
            image_id, category, question, answer = cells
            category = category.lower()
            if category not in CATEGORIES:
                raise at.error(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}",
                               field="category")
        else:
            if len(cells) != 3:
                raise at.error(f"expected ImageID|question|answer, found {len(cells)} fields",
                               field="answer" if len(cells) == 2 else None)
            image_id, question, answer = cells
            category = categories.get((split, image_id, question))
        for value, name in ((image_id, "ImageID"), (question, "question"), (answer, "answer")):
            if not value:
                raise at.error("empty text", field=name)
        if not re.fullmatch(r"[\w.-]+", image_id):
            raise at.error(f"unexpected characters in image id {image_id!r}", field="ImageID")
        answers = [option.strip() for option in answer.split("#") if option.strip()] or [answer]
        return Record(
            uid=f"vqa-med-2019/{split}/{Path(at.file).stem}/{at.record}",
            image=str(images.get(image_id, folder / f"{image_id}.jpg")),
            split=split,
            question=question,
            answer=answers[0],
            answer_type=answer_type(None, answers[0], at),
            question_type=category,
            meta={"answers": answers},
        )


def _sources(files: list[Path], split: str) -> list[Path]:
    """The files that list a split's pairs: All_QA_Pairs (else the per-category files) for train and
    validation; for test the file with reference answers (else any test file)."""
    if split == "test":
        tests = [path for path in files if _TEST_FILE.search(path.name) and not _CATEGORY_FILE.match(path.name)]
        return [path for path in tests if "answer" in path.name.lower()][:1] or tests[:1]
    listed = [path for path in files if (match := _ALL_FILE.match(path.name)) and match.group(1).lower() == split]
    return listed or [path for path in files
                      if (match := _CATEGORY_FILE.match(path.name)) and match.group(2).lower() == split]
