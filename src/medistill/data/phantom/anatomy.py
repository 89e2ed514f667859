"""Normal anatomy of each modality, drawn in the patient's frame with patient-to-patient variation.

Each renderer returns an `Anatomy`: the lesion-free, noise-free image (already blurred by the
patient's own unsharpness), named structure profiles (where findings may sit, what grounding can
name) and the words needed to describe locations. Radiological convention throughout: the
patient's right is on the image left (u < 0) for chest X-ray, CT and MR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medistill.data.phantom.geometry import Frame, ellipse, gaussian_blur, smooth_noise, smoothstep

Patient = dict[str, Any]


@dataclass
class Anatomy:
    image: np.ndarray  # float32 (H, W), roughly 0..1
    frame: Frame
    u: np.ndarray
    v: np.ndarray
    view: str
    structures: dict[str, np.ndarray]  # groundable structure name -> profile
    extras: dict[str, Any] = field(default_factory=dict)  # modality-specific facts findings need
    noise_sigma: float = 0.02  # acquisition noise (before the `noise` knob)
    edge_px: float = 1.0  # how soft lesion rims are in this patient (pixels)


def _frame(rng: np.random.Generator, size: int, span: float, mirror: bool = False) -> Frame:
    """Patient size, position and rotation: `span` is the body's half-width as a share of the image."""
    return Frame(
        size=size,
        cx=size / 2 + rng.normal(0.0, 0.02) * size,
        cy=size / 2 + rng.normal(0.0, 0.02) * size,
        scale=size / 2 * span * rng.uniform(0.92, 1.06),
        angle=float(rng.normal(0.0, 0.04)),
        mirror=mirror,
    )


def _layer(image: np.ndarray, value: float, profile: np.ndarray) -> np.ndarray:
    """Composite a tissue of intensity `value` over `image` where `profile` says it is."""
    return image + (np.float32(value) - image) * profile


def _finish(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Apply the patient's unsharpness to the anatomy (lesions get the same softness as rims)."""
    blur = rng.uniform(0.3, 1.0) * anatomy.frame.size / 256
    anatomy.image = gaussian_blur(anatomy.image, blur)
    anatomy.edge_px = 1.0 + 1.5 * blur
    anatomy.noise_sigma = float(rng.uniform(0.015, 0.03))
    return anatomy


def chest_xray(rng: np.random.Generator, size: int, patient: Patient) -> Anatomy:
    view = "AP" if rng.random() < 0.3 else "PA"
    frame = _frame(rng, size, 0.82)
    u, v = frame.coords()
    body = ellipse(u, v, 0.0, 0.3, 1.08, 1.35, 0.12)
    heart_ru = rng.uniform(0.28, 0.35) * (1.1 if view == "AP" else 1.0)
    heart_c = (0.1 + rng.normal(0, 0.02), 0.33 + rng.normal(0, 0.02))
    heart = ellipse(u, v, heart_c[0], heart_c[1], heart_ru, 0.85 * heart_ru, 0.05)
    mediastinum = smoothstep((0.14 - np.abs(u)) / 0.04) * smoothstep((0.5 - v) / 0.05)
    domes = {"right": 0.50 + rng.normal(0, 0.02), "left": 0.56 + rng.normal(0, 0.02)}
    lungs = {}
    for side, cu in (("right", -0.44), ("left", 0.44)):
        dome = domes[side] + 0.9 * (u - cu) ** 2
        lung = ellipse(u, v, cu, -0.05, 0.33, 0.75, 0.08) * smoothstep((dome - v) / 0.05)
        lungs[side] = lung * (1 - heart) * (1 - mediastinum)
    lung_all = lungs["right"] + lungs["left"]
    markings = 0.035 * smooth_noise(rng, size, 28) * lung_all * (1.3 - np.abs(u))
    image = np.float32(0.04) + 0.40 * body
    image += 0.08 * body * smoothstep((v - 0.55) / 0.1)  # upper abdomen below the domes
    image -= 0.27 * lung_all
    image += markings
    image += 0.10 * heart
    spine = smoothstep((0.075 - np.abs(u)) / 0.02) * body
    image += spine * (0.12 + 0.03 * np.cos(2 * np.pi * 9 * v))
    ribs = smoothstep((np.cos(2 * np.pi * (5.5 * v + 1.2 * u * u)) - 0.55) / 0.45)
    image += 0.06 * ribs * body * smoothstep((np.abs(u) - 0.1) / 0.05) * smoothstep((0.6 - v) / 0.1)
    clavicle_v = -0.72 + 0.15 * np.abs(u)
    clavicles = smoothstep((0.035 - np.abs(v - clavicle_v)) / 0.02) * smoothstep((0.75 - np.abs(u)) / 0.05)
    image += 0.07 * clavicles * smoothstep((np.abs(u) - 0.08) / 0.04)
    image -= 0.15 * ellipse(u, v, 0.42, domes["left"] + 0.2, 0.09, 0.05, 0.03)  # gastric bubble
    anatomy = Anatomy(
        image=image.astype(np.float32), frame=frame, u=u, v=v, view=view,
        structures={"right lung": lungs["right"], "left lung": lungs["left"], "heart": heart},
        extras={"markings": markings, "heart": (heart_c, heart_ru), "domes": domes},
    )
    return _finish(anatomy, rng)


def mammogram(rng: np.random.Generator, size: int, patient: Patient) -> Anatomy:
    laterality = patient["left or right breast"]
    view = patient["image view"]
    # the chest wall is at u = -1, on the image left for a LEFT breast and on the right for a RIGHT one
    frame = _frame(rng, size, 1.0, mirror=laterality == "RIGHT")
    frame = Frame(size, frame.cx - 0.02 * size, frame.cy, frame.scale, frame.angle * 0.5, frame.mirror)
    u, v = frame.coords()
    depth, half = rng.uniform(1.1, 1.6), rng.uniform(0.65, 0.9)
    v0 = rng.normal(0.0, 0.05) - (0.12 if view == "MLO" else 0.0)
    breast = ellipse(u, v, -1.0, v0, depth, half * (1.15 if view == "MLO" else 1.0), 0.12) * (u > -1.1)
    thickness = ellipse(u, v, -1.0, v0, depth, half * 1.15, 0.6)
    density = int(patient["breast_density"])
    gland = smoothstep(0.5 + 0.45 * smooth_noise(rng, size, 9) + 0.3 * (0.4 - (u + 1) / depth))
    image = np.float32(0.02) + breast * (0.20 + 0.14 * thickness)
    image += (0.06 + 0.09 * density) * gland * thickness * breast
    image += 0.03 * smooth_noise(rng, size, 40) * breast
    image += 0.04 * smoothstep((0.3 - breast) / 0.3) * breast  # brighter skin line
    structures = {"breast": breast}
    if view == "MLO":
        width, height = rng.uniform(0.35, 0.6), rng.uniform(0.9, 1.5)
        pectoral = smoothstep((1.0 - (u + 1.0) / width - (v + 1.0) / height) / 0.05) * (u > -1.1)
        image = _layer(image, 0.62, pectoral * (breast > 0))
        structures["pectoral muscle"] = pectoral * (breast > 0)
    anatomy = Anatomy(
        image=image.astype(np.float32), frame=frame, u=u, v=v, view=view, structures=structures,
        extras={"depth": depth, "fibroglandular": gland * breast},
    )
    return _finish(anatomy, rng)


def abdomen_ct(rng: np.random.Generator, size: int, patient: Patient) -> Anatomy:
    frame = _frame(rng, size, 0.92)
    u, v = frame.coords()
    fat = rng.uniform(0.04, 0.12)
    body = ellipse(u, v, 0.0, 0.05, 0.92, 0.7, 0.03)
    viscera = ellipse(u, v, 0.0, 0.05, 0.92 - fat, 0.7 - fat, 0.03)
    liver = ellipse(u, v, -0.42, -0.02, 0.36, 0.45, 0.05) * viscera
    spleen = ellipse(u, v, 0.55, 0.22, 0.13, 0.2, 0.04) * viscera
    kidneys = {side: ellipse(u, v, cu, 0.36, 0.09, 0.13, 0.04) for side, cu in (("right", -0.33), ("left", 0.33))}
    bowel = ellipse(u, v, 0.15, -0.25, 0.38, 0.3, 0.1) * (1 - liver) * viscera
    gas = smoothstep((smooth_noise(rng, size, 18) - 1.3) / 0.3) * bowel
    image = np.zeros_like(u)
    image = _layer(image, 0.28, body)
    image = _layer(image, 0.47, viscera)
    image += 0.06 * smooth_noise(rng, size, 16) * bowel
    image = _layer(image, 0.05, gas)
    image = _layer(image, 0.58, liver)
    image = _layer(image, 0.55, spleen)
    for kidney in kidneys.values():
        image = _layer(image, 0.68, kidney)
    image = _layer(image, 0.90, ellipse(u, v, 0.0, 0.46, 0.12, 0.1, 0.03))  # vertebral body
    image = _layer(image, 0.85, ellipse(u, v, 0.0, 0.66, 0.12, 0.06, 0.03))  # posterior elements
    image = _layer(image, 0.35, ellipse(u, v, 0.0, 0.59, 0.04, 0.035, 0.02))  # spinal canal
    aorta = ellipse(u, v, 0.06, 0.3, 0.045, 0.045, 0.02)
    image = _layer(image, 0.80, aorta)
    image = _layer(image, 0.62, ellipse(u, v, -0.1, 0.28, 0.05, 0.04, 0.02))  # IVC
    structures = {"liver": liver, "spleen": spleen, "right kidney": kidneys["right"],
                  "left kidney": kidneys["left"], "aorta": aorta}
    anatomy = Anatomy(image=image.astype(np.float32), frame=frame, u=u, v=v, view="axial", structures=structures)
    return _finish(anatomy, rng)


MR_INTENSITIES = {  # scalp, bone, csf, grey matter, white matter
    "T1": (0.85, 0.08, 0.12, 0.45, 0.62),
    "T2": (0.55, 0.05, 0.92, 0.55, 0.38),
    "FLAIR": (0.50, 0.05, 0.10, 0.55, 0.42),
}


def brain_mr(rng: np.random.Generator, size: int, patient: Patient) -> Anatomy:
    sequence = patient["sequence"]
    scalp, bone, csf, grey, white = MR_INTENSITIES[sequence]
    frame = _frame(rng, size, 0.9)
    u, v = frame.coords()
    atrophy = rng.uniform(0.0, 0.06) + max(0.0, (patient["age"] - 50) / 600)
    head = ellipse(u, v, 0, 0, 0.78, 0.95, 0.02)
    skull = ellipse(u, v, 0, 0, 0.73, 0.9, 0.02)
    brain = ellipse(u, v, 0, 0, 0.69 - atrophy / 2, 0.86 - atrophy / 2, 0.03)
    white_matter = ellipse(u, v, 0, 0.02, 0.5, 0.66, 0.15) * (1 + 0.25 * smooth_noise(rng, size, 14)).clip(0, 1)
    # sulci: thin winding lines where a smooth random field crosses zero, wider with atrophy
    sulci = smoothstep((0.12 + atrophy - np.abs(smooth_noise(rng, size, 16))) / 0.08) * brain * (1 - white_matter)
    ventricles = {side: ellipse(u, v, cu, -0.05, 0.05 + atrophy, 0.28, 0.03) for side, cu in (("right", -0.1), ("left", 0.1))}
    image = np.zeros_like(u)
    image = _layer(image, scalp, head)
    image = _layer(image, bone, skull)
    image = _layer(image, csf, ellipse(u, v, 0, 0, 0.71, 0.88, 0.02))
    image = _layer(image, grey, brain)
    image = _layer(image, white, white_matter * brain)
    image = _layer(image, csf, 0.8 * sulci)
    for ventricle in ventricles.values():
        image = _layer(image, csf, ventricle)
    structures = {"brain": brain, "right lateral ventricle": ventricles["right"],
                  "left lateral ventricle": ventricles["left"]}
    anatomy = Anatomy(image=image.astype(np.float32), frame=frame, u=u, v=v, view="axial",
                      structures=structures, extras={"sequence": sequence, "tissue": (grey, white, csf)})
    return _finish(anatomy, rng)


RENDERERS: dict[str, Callable[[np.random.Generator, int, Patient], Anatomy]] = {
    "cxr": chest_xray, "mammo": mammogram, "ct": abdomen_ct, "mr": brain_mr,
}
