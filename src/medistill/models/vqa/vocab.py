"""The answer vocabulary of a Med-VQA model, built from training records only.

The answers are normalised (`medistill.metrics.vqa.normalize_answer`) and ordered by frequency, then
alphabetically, so index 0 is the most common training answer. The `fingerprint` (a hash of the ordered
answer list) goes into a checkpoint; `check_matches` refuses a vocabulary file that does not belong to it.
Test records never enter: `from_records` refuses any record whose split is not "train", and
`out_of_vocabulary` says how many test questions the vocabulary cannot answer at all.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medistill.data.records import Record
from medistill.engine.logging import write_json
from medistill.errors import ConfigError, DataError, UsageError
from medistill.metrics.vqa import accepted_answers, normalize_answer

FORMAT = "medistill-answer-vocabulary"
VERSION = 1


def answers_fingerprint(answers: Sequence[str]) -> str:
    """A short SHA-256 of the ordered answer list (order matters: it fixes the class indices)."""
    payload = json.dumps(list(answers), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class AnswerVocabulary:
    """Ordered, normalised answers with their training counts and an index lookup."""

    def __init__(self, answers: Sequence[str], counts: Sequence[int], source: str | None = None) -> None:
        if len(answers) != len(counts):
            raise ValueError(f"{len(answers)} answers but {len(counts)} counts")
        self.answers: tuple[str, ...] = tuple(answers)
        self.counts: tuple[int, ...] = tuple(int(count) for count in counts)
        self.source = source  # the file it was loaded from, for error messages
        self._index = {answer: i for i, answer in enumerate(self.answers)}
        if len(self._index) != len(self.answers):
            raise ValueError("answers must be distinct")
        self.fingerprint = answers_fingerprint(self.answers)

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> AnswerVocabulary:
        """Count each training record's primary answer (normalised). Any record not in split "train" is
        refused: a vocabulary that saw validation or test answers leaks them into the model."""
        records = list(records)
        foreign = [record for record in records if record.split != "train"]
        if foreign:
            splits = ", ".join(sorted({str(record.split) for record in foreign}))
            raise UsageError(
                f"an answer vocabulary is built from training records only, but {len(foreign)} of "
                f"{len(records)} records are from split(s) {splits} (first: {foreign[0].uid}): "
                "pass only the records whose split is 'train'")
        if not records:
            raise UsageError("no training records to build an answer vocabulary from")
        counts = Counter(accepted_answers(record)[0] for record in records)
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([answer for answer, _ in ordered], [count for _, count in ordered])

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return isinstance(answer, str) and normalize_answer(answer) in self._index

    def index(self, answer: str) -> int | None:
        """The class index of `answer` (normalised first), or None when it is not in the vocabulary."""
        return self._index.get(normalize_answer(answer))

    def answer(self, index: int) -> str:
        """The answer text at class `index`."""
        return self.answers[index]

    def count(self, answer: str) -> int:
        """How often `answer` occurred in training (0 when absent)."""
        i = self.index(answer)
        return 0 if i is None else self.counts[i]

    def target(self, record: Record) -> int | None:
        """The class index of the first accepted answer of `record` that is in the vocabulary, else None (also
        for a question without an answer, as at prediction time)."""
        if record.answer is None and not record.meta.get("answers"):
            return None
        for answer in accepted_answers(record):
            i = self._index.get(answer)
            if i is not None:
                return i
        return None

    def out_of_vocabulary(self, records: Iterable[Record]) -> dict[str, Any]:
        """How many questions no vocabulary answer can get right (none of their accepted answers is in it):
        `overall`, `open`, `closed` (by `answer_type`) as `{"n", "oov", "share"}`, and `answers`, the
        out-of-vocabulary reference answers with how many questions have them. `share` is an upper bound
        on the accuracy lost to the vocabulary; report it beside any accuracy."""
        groups: dict[str, list[bool]] = {"overall": [], "open": [], "closed": []}
        missing: Counter[str] = Counter()
        for record in records:
            oov = self.target(record) is None
            groups["overall"].append(oov)
            kind = (record.answer_type or "").strip().lower()
            if kind in groups:
                groups[kind].append(oov)
            if oov:
                missing[accepted_answers(record)[0]] += 1
        report: dict[str, Any] = {
            name: {"n": len(flags), "oov": sum(flags), "share": sum(flags) / len(flags) if flags else None}
            for name, flags in groups.items()
        }
        report["answers"] = dict(sorted(missing.items(), key=lambda item: (-item[1], item[0])))
        return report

    def check_matches(self, expected_fingerprint: str) -> None:
        """Raise `ConfigError` unless this vocabulary is the one a checkpoint was trained with."""
        if expected_fingerprint != self.fingerprint:
            where = f" {self.source}" if self.source else ""
            raise ConfigError(
                f"answer vocabulary{where} (fingerprint {self.fingerprint}, {len(self)} answers) does not match "
                f"the checkpoint (fingerprint {expected_fingerprint}): use the vocabulary file saved with that "
                "checkpoint, or retrain with this one")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                "answers": list(self.answers), "counts": list(self.counts)}

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (answers, counts, fingerprint)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> AnswerVocabulary:
        """Read a file written by `save`; a missing, malformed or edited file is a clear error."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"answer vocabulary {path} does not exist: pass the file saved with the checkpoint")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"not a readable JSON file ({error})", file=str(path)) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"not an answer vocabulary (expected \"format\": \"{FORMAT}\")", file=str(path))
        if data.get("version") != VERSION:
            raise DataError(f"unsupported version {data.get('version')!r}; this medistill reads {VERSION}",
                            file=str(path), field="version")
        answers, counts = data.get("answers"), data.get("counts")
        if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
            raise DataError("expected a list of strings", file=str(path), field="answers")
        if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise DataError("expected a list of integers", file=str(path), field="counts")
        try:
            vocabulary = cls(answers, counts, source=str(path))
        except ValueError as error:
            raise DataError(str(error), file=str(path)) from None
        if data.get("fingerprint") != vocabulary.fingerprint:
            raise DataError(f"stored fingerprint {data.get('fingerprint')!r} does not match its answers "
                            f"({vocabulary.fingerprint}): the file was edited; rebuild it from the training split",
                            file=str(path), field="fingerprint")
        return vocabulary
