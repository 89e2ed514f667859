"""Static facts about each phantom modality (names, field of view, label sets, words)."""

from __future__ import annotations

from dataclasses import dataclass

CXR_FINDINGS: tuple[str, ...] = (
    "nodule", "mass", "consolidation", "pleural_effusion", "cardiomegaly", "pneumothorax",
)
MAMMO_ABNORMALITIES: tuple[str, ...] = ("mass", "calcification")
CT_FINDINGS: tuple[str, ...] = ("liver_lesion", "renal_cyst")
MR_FINDINGS: tuple[str, ...] = ("tumor", "infarct")


@dataclass(frozen=True)
class ModalitySpec:
    name: str  # the CLI name
    code: int  # enters the seed sequence; never change it (it would change every image)
    medgrit_prefix: str  # Med-GRIT file-name prefix
    words: str  # how the modality is named in answers
    organ: str  # VQA-RAD image_organ
    organ_words: str  # the body part in plain words
    fov_mm: float  # field of view across the image
    labels: tuple[str, ...]  # the image-level finding labels

    def spacing_mm(self, image_size: int) -> float:
        return self.fov_mm / image_size


SPECS: dict[str, ModalitySpec] = {
    spec.name: spec
    for spec in (
        ModalitySpec("cxr", 1, "x_ray", "x-ray", "CHEST", "chest", 400.0, CXR_FINDINGS),
        ModalitySpec("mammo", 2, "mammo", "mammography", "BREAST", "breast", 220.0, MAMMO_ABNORMALITIES),
        ModalitySpec("ct", 3, "ct", "ct", "ABD", "abdomen", 380.0, CT_FINDINGS),
        ModalitySpec("mr", 4, "mr", "mri", "HEAD", "brain", 240.0, MR_FINDINGS),
    )
}
MODALITIES: tuple[str, ...] = tuple(SPECS)
