"""Reader for a phantom world written by `medistill.data.phantom.write_phantom` (its own index).

Options: `task` = "labels" (one record per image), "vqa" (one per question, from the VQA-RAD JSON)
or "grounding" (one per image and grounding task); `modality` = one of the phantom modalities or
None for all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medistill.data.formats.base import Reader, register_format
from medistill.data.records import Box, Record, Region, Turn
from medistill.errors import DataError, UsageError

TASKS = ("labels", "vqa", "grounding")
VQA_FILE = "vqa-rad/VQA_RAD Dataset Public.json"
REQUIRED = ("uid", "modality", "view", "split", "image", "labels", "findings", "report", "table")


@register_format
class PhantomReader(Reader):
    name = "phantom"
    description = "the embedded synthetic world (cases.jsonl written by `medistill phantom`)"

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.task = self.options.get("task", "labels")
        if self.task not in TASKS:
            raise UsageError(f"phantom task must be one of {', '.join(TASKS)}, not {self.task!r}")
        self.modality = self.options.get("modality")
        index = self.root / "cases.jsonl"
        if not index.is_file():
            raise UsageError(f"{index} not found: pass the folder that `medistill phantom` wrote")

    def referenced_image_dir(self) -> Path | None:
        return self.root / "images"

    def _cases(self) -> Iterator[tuple[int, dict[str, Any]]]:
        path = self.root / "cases.jsonl"
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    case = json.loads(line)
                    if not isinstance(case, dict):
                        raise ValueError("not a JSON object")
                except ValueError as error:
                    self.fail(DataError(f"not valid JSON ({error})", file=str(path), record=number))
                    continue
                missing = next((key for key in REQUIRED if key not in case), None)
                if missing:
                    self.fail(DataError("missing", file=str(path), record=number, field=missing))
                    continue
                if self.modality is None or case["modality"] == self.modality:
                    yield number, case

    def _read(self) -> Iterator[Record]:
        reader = {"labels": self._labels, "vqa": self._vqa, "grounding": self._grounding}[self.task]
        yield from reader()

    def _base(self, case: dict[str, Any], **fields: Any) -> Record:
        width, height = case.get("image_size", (None, None))
        values: dict[str, Any] = {
            "uid": case["uid"], "image": str(self.root / case["image"]), "split": case["split"],
            "study_id": case.get("study_id"), "patient_id": case.get("patient_id"), "modality": case["modality"],
            "view": case["view"], "image_size": (width, height) if width else None,
        }
        return Record(**{**values, **fields})

    def _labels(self) -> Iterator[Record]:
        path = str(self.root / "cases.jsonl")
        for number, case in self._cases():
            try:
                regions = [
                    Region(label=f["label"], box=Box(*map(float, f["box"])), mask=str(self.root / f["mask"]),
                           attributes={**f["attributes"], "location": f["location"], "size_mm": f["size_mm"]})
                    for f in case["findings"]
                ]
                labels = {name: float(value) for name, value in case["labels"].items()}
                report = (self.root / case["report"]).read_text(encoding="utf-8")
            except (KeyError, TypeError, ValueError) as error:
                self.fail(DataError(f"malformed finding or label ({error})", file=path, record=number, field="findings"))
                continue
            except OSError:
                self.fail(DataError("report file not found", file=path, record=number, field="report"))
                continue
            meta = {"clean_labels": case.get("clean_labels", {}), "pathology": case.get("pathology"),
                    "report_mentions": case.get("report_mentions", {}), "spacing_mm": case.get("spacing_mm")}
            yield self._base(case, labels=labels, regions=regions, report=report, table=case["table"], meta=meta)

    def _vqa(self) -> Iterator[Record]:
        path = self.root / VQA_FILE
        cases = {case["layouts"].get("vqa-rad", "").rsplit("/", 1)[-1]: case for _, case in self._cases()}
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read the VQA file ({error})", file=str(path)) from None
        for number, entry in enumerate(entries):
            try:
                case = cases.get(entry["image_name"])
                if case is None:
                    continue  # another modality (filtered out)
                test = entry["phrase_type"].startswith("test")
                split = "test" if test else ("val" if case["split"] == "val" else "train")
                meta = {"qid": entry["qid"], "phrase_type": entry["phrase_type"], "qid_linked_id": entry["qid_linked_id"]}
                yield self._base(case, question=entry["question"], answer=str(entry["answer"]),
                                 answer_type=entry["answer_type"], question_type=entry["question_type"],
                                 meta=meta, uid=f"{case['uid']}-q{entry['qid']}", split=split)
            except (KeyError, TypeError, AttributeError) as error:
                self.fail(DataError(f"malformed VQA entry ({error})", file=str(path), record=number))

    def _grounding(self) -> Iterator[Record]:
        path = str(self.root / "cases.jsonl")
        for number, case in self._cases():
            try:
                image = str(self.root / case["layouts"]["med-grit"])
                for conversation in case["conversations"]:
                    turns = [Turn(question=q, answer=a) for q, a in conversation["turns"]]
                    yield self._base(case, conversations=turns, task=conversation["task"],
                                     uid=f"{case['uid']}-{conversation['task']}", image=image)
            except (KeyError, TypeError, ValueError) as error:
                self.fail(DataError(f"malformed conversation ({error})", file=path, record=number, field="conversations"))
