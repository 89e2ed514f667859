"""One phantom case: an image with its findings, labels, report, table row, VQA pairs and conversations.

A case depends only on (seed, modality, index) and the knobs: each part of it draws from its own
random stream spawned from `SeedSequence([seed, modality code, index])`, so cases can be made in
any order or in parallel, and turning one knob (say, report completeness) leaves the images alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medistill.data.phantom.anatomy import RENDERERS
from medistill.data.phantom.findings import Finding, make_findings
from medistill.data.phantom.grounding import Conversation, make_conversations
from medistill.data.phantom.knobs import PhantomKnobs
from medistill.data.phantom.reports import write_report
from medistill.data.phantom.spec import SPECS
from medistill.data.phantom.tables import ROW_MAKERS, sample_patient
from medistill.data.phantom.vqa import QA, make_questions
from medistill.errors import UsageError

STREAMS = ("split", "patient", "anatomy", "findings", "noise", "labels", "table", "report", "vqa", "grounding")


@dataclass
class PhantomCase:
    uid: str
    modality: str
    index: int
    view: str
    split: str  # train / val / test
    image: np.ndarray  # uint8 (H, W)
    spacing_mm: float
    findings: list[Finding]
    labels: dict[str, float]  # training labels: label noise applied in the train split
    clean_labels: dict[str, float]
    report: str
    mentions: dict[str, str]  # label -> positive / uncertain / negative, as the report states it
    table: dict[str, Any]
    ids: dict[str, str]  # patient_id, study_id and the layout-specific ids (dicom_id, medgrit_id, ...)
    vqa: list[QA] = field(default_factory=list)
    conversations: list[Conversation] = field(default_factory=list)
    pathology: str | None = None  # mammography: the worst pathology of the image's abnormalities


def _streams(seed: int, modality: str, index: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence([seed, SPECS[modality].code, index]).spawn(len(STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(STREAMS, children)}


def _ids(seed: int, modality: str, index: int) -> dict[str, str]:
    digest = hashlib.sha1(f"{seed}/{modality}/{index}".encode()).hexdigest()
    spec = SPECS[modality]
    return {
        "patient_id": f"P_{index + 1:05d}" if modality == "mammo" else str(10_000_000 * spec.code + index),
        "study_id": str(50_000_000 + 1_000_000 * spec.code + index),
        "dicom_id": "-".join(digest[i:i + 8] for i in range(0, 40, 8)),
        "medgrit_id": f"{spec.medgrit_prefix}_phantom_{index:06d}",
    }


def _split(rng: np.random.Generator, knobs: PhantomKnobs) -> str:
    draw = rng.random()
    return "test" if draw < knobs.test_fraction else "val" if draw < knobs.test_fraction + knobs.val_fraction else "train"


def _labels(modality: str, findings: list[Finding]) -> tuple[dict[str, float], str | None]:
    if modality == "mammo":
        if not findings:
            return {}, None
        pathologies = {f.attributes["pathology"] for f in findings}
        worst = next(p for p in ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK") if p in pathologies)
        return {"malignant": float(worst == "MALIGNANT")}, worst
    present = {f.label for f in findings}
    return {name: float(name in present) for name in SPECS[modality].labels}, None


def _exposure(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Detector noise, exposure (gain, offset, gamma) and 8-bit quantisation."""
    gain, offset, gamma = rng.uniform(0.9, 1.1), rng.normal(0.0, 0.02), rng.uniform(0.85, 1.15)
    noisy = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    exposed = np.clip(noisy * np.float32(gain) + np.float32(offset), 0.0, 1.0) ** np.float32(gamma)
    return np.round(exposed * 255.0).astype(np.uint8)


def _build(seed: int, index: int, modality: str, knobs: PhantomKnobs, draw_findings: bool) -> PhantomCase:
    if modality not in SPECS:
        raise UsageError(f"unknown phantom modality {modality!r}; known modalities: {', '.join(SPECS)}")
    spec = SPECS[modality]
    rngs = _streams(seed, modality, index)
    split = _split(rngs["split"], knobs)
    ids = _ids(seed, modality, index)
    patient = sample_patient(modality, rngs["patient"])
    patient["patient_id"] = ids["patient_id"]
    spacing = spec.spacing_mm(knobs.image_size)
    anatomy = RENDERERS[modality](rngs["anatomy"], knobs.image_size, patient)
    findings, delta = make_findings(modality, rngs["findings"], anatomy, patient, knobs, spacing)
    image = anatomy.image + delta if draw_findings else anatomy.image
    pixels = _exposure(rngs["noise"], image, anatomy.noise_sigma * knobs.noise)
    clean, pathology = _labels(modality, findings)
    labels = dict(clean)
    if split == "train":
        flips = rngs["labels"].random(len(clean)) < knobs.label_noise
        labels = {name: (1.0 - value if flip else value) for (name, value), flip in zip(clean.items(), flips)}
    present = {f.label for f in findings}
    table = ROW_MAKERS[modality](rngs["table"], patient, anatomy.view, present, findings)
    report, mentions = write_report(modality, rngs["report"], findings, table, anatomy.view, knobs, spec.labels)
    return PhantomCase(
        uid=f"{modality}-{index:06d}", modality=modality, index=index, view=anatomy.view, split=split,
        image=pixels, spacing_mm=spacing, findings=findings, labels=labels, clean_labels=clean,
        report=report, mentions=mentions, table=table, ids=ids,
        vqa=make_questions(modality, anatomy.view, findings, rngs["vqa"]),
        conversations=make_conversations(modality, ids["medgrit_id"], anatomy, findings, rngs["grounding"]),
        pathology=pathology,
    )


def generate_case(seed: int, index: int, modality: str, knobs: PhantomKnobs) -> PhantomCase:
    """Make case `index` of `modality` in the world `seed`; the same arguments give the same case."""
    return _build(seed, index, modality, knobs, draw_findings=True)


def lesion_free_image(seed: int, index: int, modality: str, knobs: PhantomKnobs) -> np.ndarray:
    """The same case's image with its findings left out (same anatomy, noise and exposure)."""
    return _build(seed, index, modality, knobs, draw_findings=False).image
