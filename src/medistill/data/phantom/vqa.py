"""VQA-RAD-style question-answer pairs, answered from the true findings (not from the report).

Each image gets one question of every type that applies to it; some questions also get a
paraphrase (VQA-RAD's `para` rows, linked to the free-form question by `qid_linked_id`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medistill.data.phantom.findings import Finding
from medistill.data.phantom.spec import SPECS, ModalitySpec

QUESTION_TYPES = ("MODALITY", "PLANE", "ORGAN", "ABN", "PRES", "POS", "SIZE", "COUNT", "ATTRIB")


@dataclass(frozen=True)
class QA:
    question_type: str
    question: str
    answer: str
    answer_type: str  # CLOSED or OPEN
    paraphrase: str | None = None  # another wording of the same question
    frame: str | None = None  # VQA-RAD's question_frame: the template the question fills


def words(label: str) -> str:
    return label.replace("_", " ")


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


@dataclass(frozen=True)
class Subject:
    modality: ModalitySpec
    view: str
    findings: list[Finding]
    rng: np.random.Generator

    def pick(self, options: tuple[str, ...] | list[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def main(self) -> Finding | None:
        """The largest finding: the one a question about 'the abnormality' is about."""
        return max(self.findings, key=lambda f: f.size_mm, default=None)


def _two(s: Subject, templates: tuple[str, ...], **fill: str) -> tuple[str, str]:
    """A question and a paraphrase, two different templates filled alike."""
    first, second = s.rng.choice(len(templates), size=2, replace=False)
    return templates[first].format(**fill), templates[second].format(**fill)


def modality_q(s: Subject) -> QA | None:
    if s.rng.random() < 0.5:
        q, p = _two(s, ("What imaging modality was used?", "How was this image taken?", "What type of imaging is this?"))
        return QA("MODALITY", q, s.modality.words, "OPEN", p, "What is the modality?")
    other = s.pick([spec.words for spec in SPECS.values()])
    q, p = _two(s, ("Is this an {m} image?", "Was this image taken with {m}?", "Is the modality {m}?"), m=other)
    return QA("MODALITY", q, _yes(other == s.modality.words), "CLOSED", p, "Is this a/an {modality}?")


def plane_q(s: Subject) -> QA | None:
    q, p = _two(s, ("In what plane is this image?", "Which view is this?", "What is the imaging plane?"))
    return QA("PLANE", q, s.view.lower(), "OPEN", p, "What plane is this?")


def organ_q(s: Subject) -> QA | None:
    if s.rng.random() < 0.5:
        q, p = _two(s, ("What organ system is shown?", "What part of the body is imaged?", "Which organ is pictured?"))
        return QA("ORGAN", q, s.modality.organ_words, "OPEN", p, "What organ is shown?")
    other = s.pick([spec.organ_words for spec in SPECS.values()])
    q, p = _two(s, ("Is this an image of the {o}?", "Does this image show the {o}?"), o=other)
    return QA("ORGAN", q, _yes(other == s.modality.organ_words), "CLOSED", p, "Is this the {organ}?")


def abn_q(s: Subject) -> QA | None:
    main = s.main()
    if main is not None and s.rng.random() < 0.5:
        q, p = _two(s, ("What is the abnormality?", "What abnormality is seen?", "What is abnormal in this image?"))
        return QA("ABN", q, words(main.label), "OPEN", p, "What is abnormal?")
    q, p = _two(s, ("Is this image abnormal?", "Is there an abnormality?", "Is anything wrong in this image?"))
    return QA("ABN", q, _yes(main is not None), "CLOSED", p, "Is there an abnormality?")


def pres_q(s: Subject) -> QA | None:
    present = sorted({f.label for f in s.findings})
    label = s.pick(present) if present and s.rng.random() < 0.5 else s.pick(s.modality.labels)
    q, p = _two(s, ("Is there {a} {x}?", "Is {a} {x} present?", "Does the image show {a} {x}?"),
                a="an" if label[0] in "aeiou" else "a", x=words(label))
    return QA("PRES", q, _yes(label in present), "CLOSED", p, "Is/Are there {finding}?")


def pos_q(s: Subject) -> QA | None:
    main = s.main()
    if main is None:
        return None
    if "side" in main.location and s.rng.random() < 0.4:
        side = s.pick(("left", "right"))
        q, p = _two(s, ("Is the {x} on the {side} side?", "Is the {x} located on the patient's {side}?"), x=words(main.label), side=side)
        return QA("POS", q, _yes(main.location["side"] == side), "CLOSED", p, "Is the {finding} on the {side}?")
    q, p = _two(s, ("Where is the {x} located?", "Where is the {x}?", "What is the location of the {x}?"), x=words(main.label))
    return QA("POS", q, main.location["phrase"], "OPEN", p, "Where is the {finding}?")


def size_q(s: Subject) -> QA | None:
    main = s.main()
    if main is None:
        return None
    q, p = _two(s, ("How large is the {x}?", "What is the size of the {x}?", "How big is the {x}?"), x=words(main.label))
    return QA("SIZE", q, f"{5 * max(1, round(main.size_mm / 5))} mm", "OPEN", p, "How large is the {finding}?")


def count_q(s: Subject) -> QA | None:
    q, p = _two(s, ("How many lesions are there?", "How many abnormalities are seen?", "What is the number of findings?"))
    return QA("COUNT", q, str(len(s.findings)), "OPEN", p, "How many {findings} are there?")


ATTRIBUTE_QUESTIONS: dict[str, tuple[str, str, str]] = {  # attribute -> question, answer type, frame
    "margin": ("What are the margins of the {x} like?", "OPEN", "What are the margins of the {finding}?"),
    "mass shape": ("What is the shape of the {x}?", "OPEN", "What is the shape of the {finding}?"),
    "mass margins": ("What are the margins of the {x} like?", "OPEN", "What are the margins of the {finding}?"),
    "calc type": ("What type of {x} is this?", "OPEN", "What type of {finding}?"),
    "air_bronchograms": ("Are there air bronchograms in the {x}?", "CLOSED", "Is/Are there {attribute}?"),
    "amount": ("Is the {x} small, moderate or large?", "CLOSED", "Is the {finding} {options}?"),
    "severity": ("Is the {x} mild or moderate?", "CLOSED", "Is the {finding} {options}?"),
    "size": ("Is the {x} small or moderate?", "CLOSED", "Is the {finding} {options}?"),
    "density": ("What is the density of the {x}?", "OPEN", "What is the density of the {finding}?"),
    "enhancement": ("What is the enhancement pattern of the {x}?", "OPEN", "What is the enhancement of the {finding}?"),
    "stage": ("Is the {x} acute or chronic?", "CLOSED", "Is the {finding} {options}?"),
}


def attrib_q(s: Subject) -> QA | None:
    main = s.main()
    if main is None:
        return None
    askable = [key for key in main.attributes if key in ATTRIBUTE_QUESTIONS]
    if not askable:
        return None
    key = s.pick(askable)
    template, answer_type, frame = ATTRIBUTE_QUESTIONS[key]
    value = main.attributes[key]
    answer = _yes(value) if isinstance(value, bool) else str(value).lower().replace("_", " ")
    return QA("ATTRIB", template.format(x=words(main.label)), answer, answer_type, None, frame)


ASKERS: tuple[Callable[[Subject], QA | None], ...] = (
    modality_q, plane_q, organ_q, abn_q, pres_q, pos_q, size_q, count_q, attrib_q,
)


def make_questions(modality: str, view: str, findings: list[Finding], rng: np.random.Generator,
                   paraphrase_share: float = 0.3) -> list[QA]:
    subject = Subject(SPECS[modality], view, findings, rng)
    questions = []
    for ask in ASKERS:
        qa = ask(subject)
        if qa is None:
            continue
        if qa.paraphrase is not None and rng.random() >= paraphrase_share:
            qa = QA(qa.question_type, qa.question, qa.answer, qa.answer_type, None, qa.frame)
        questions.append(qa)
    return questions
