"""Findings: which a patient has (drawn from risk factors), and how each changes the image.

Every finding is drawn as a profile (soft indicator) and an intensity change `delta` that is zero
wherever the profile is zero; the mask is exactly `profile > 0`, so a lesion changes the image
only inside its mask and the box is the mask's bounding box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medistill.data.phantom.anatomy import Anatomy, Patient
from medistill.data.phantom.geometry import Shape, draw, ellipse, mask_box, sample_point, smooth_noise, smoothstep, stamp_dots
from medistill.data.phantom.knobs import PhantomKnobs


@dataclass
class Finding:
    label: str
    mask: np.ndarray  # bool (H, W)
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive
    location: dict[str, str]  # clinical words; "phrase" joins them for a sentence
    size_mm: float  # largest extent
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lesion:
    """What a maker draws, before it becomes a `Finding`."""

    label: str
    profile: np.ndarray
    delta: np.ndarray
    location: dict[str, str]
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """Everything a maker needs: the anatomy, the patient, and this image's lesion contrast scale."""

    rng: np.random.Generator
    anatomy: Anatomy
    patient: Patient
    contrast: float  # 1 - subtlety
    spacing_mm: float

    def amplitude(self, base: float) -> tuple[float, float]:
        """A lesion's intensity change and its conspicuity (0.6..1.4, how obvious it is in this patient)."""
        conspicuity = float(self.rng.uniform(0.6, 1.4))
        return base * self.contrast * conspicuity, conspicuity

    def mm(self, millimetres: float) -> float:
        return millimetres / self.spacing_mm

    def shape(self, x: float, y: float, radius_mm: float, irregularity: float = 0.0, **kwargs: Any) -> Shape:
        """A lesion outline: irregularity adds random low-order harmonics to the boundary."""
        rng = self.rng
        harmonics = tuple(
            (k, float(rng.uniform(0.3, 1.0) * irregularity), float(rng.uniform(0, 2 * np.pi)))
            for k in range(2, 7)
        ) if irregularity > 0 else ()
        kwargs.setdefault("aspect", float(rng.uniform(1.0, 1.3)))
        kwargs.setdefault("edge", self.anatomy.edge_px)
        return Shape(x, y, self.mm(radius_mm), angle=float(rng.uniform(0, np.pi)), harmonics=harmonics, **kwargs)

    def where(self, x: float, y: float) -> tuple[float, float]:
        """The patient-frame coordinates (u, v) of a pixel."""
        size = self.anatomy.frame.size
        row, col = min(max(int(y), 0), size - 1), min(max(int(x), 0), size - 1)
        return float(self.anatomy.u[row, col]), float(self.anatomy.v[row, col])


# -- chest X-ray ------------------------------------------------------------------------------------

LOBES = {
    ("right", "upper"): "right upper lobe", ("right", "mid"): "right middle lobe",
    ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
    ("left", "mid"): "lingula", ("left", "lower"): "left lower lobe",
}


def _lung_location(ctx: Context, x: float, y: float) -> dict[str, str]:
    u, v = ctx.where(x, y)
    side = "right" if u < 0 else "left"  # the patient's right is on the image left
    zone = "upper" if v < -0.3 else "mid" if v < 0.2 else "lower"
    return {"side": side, "zone": zone, "lobe": LOBES[side, zone], "phrase": f"{side} {zone} zone"}


def _lung_point(ctx: Context, side: str | None = None) -> tuple[str, float, float]:
    side = side or ("right" if ctx.rng.random() < 0.5 else "left")
    x, y = sample_point(ctx.rng, ctx.anatomy.structures[f"{side} lung"] > 0.8)
    return side, x, y


def nodule(ctx: Context) -> Lesion:
    _, x, y = _lung_point(ctx)
    profile = draw(ctx.shape(x, y, ctx.rng.uniform(6.0, 15.0), irregularity=0.05), ctx.anatomy.frame.size)
    amp, conspicuity = ctx.amplitude(0.45)
    return Lesion("nodule", profile, amp * profile, _lung_location(ctx, x, y), {"conspicuity": conspicuity})


def mass(ctx: Context) -> Lesion:
    _, x, y = _lung_point(ctx)
    margin = "spiculated" if ctx.rng.random() < 0.3 else "lobulated"
    spikes = tuple((float(a), float(ctx.rng.uniform(0.3, 0.7))) for a in ctx.rng.uniform(0, 2 * np.pi, 9)) \
        if margin == "spiculated" else ()
    shape = ctx.shape(x, y, ctx.rng.uniform(15.0, 30.0), irregularity=0.08, spikes=spikes)
    profile = draw(shape, ctx.anatomy.frame.size)
    amp, conspicuity = ctx.amplitude(0.36)
    return Lesion("mass", profile, amp * profile, _lung_location(ctx, x, y),
                  {"margin": margin, "conspicuity": conspicuity})


def consolidation(ctx: Context) -> Lesion:
    side, x, y = _lung_point(ctx)
    size = ctx.anatomy.frame.size
    patch = draw(ctx.shape(x, y, ctx.rng.uniform(22.0, 45.0), irregularity=0.15, aspect=1.4), size)
    profile = patch * ctx.anatomy.structures[f"{side} lung"] * np.clip(0.7 + 0.4 * smooth_noise(ctx.rng, size, 20), 0, 1)
    amp, conspicuity = ctx.amplitude(0.3)
    bronchograms = bool(ctx.rng.random() < 0.4)
    return Lesion("consolidation", profile, amp * profile, _lung_location(ctx, x, y),
                  {"air_bronchograms": bronchograms, "conspicuity": conspicuity})


def pleural_effusion(ctx: Context) -> Lesion:
    side = "right" if ctx.rng.random() < 0.5 else "left"
    a = ctx.anatomy
    depth = float(ctx.rng.uniform(0.08, 0.4))
    lateral = np.abs(a.u) - 0.3
    meniscus = a.extras["domes"][side] - depth - 0.5 * np.maximum(lateral, 0.0)
    profile = a.structures[f"{side} lung"] * smoothstep((a.v - meniscus) / 0.06)
    amount = "small" if depth < 0.17 else "moderate" if depth < 0.3 else "large"
    amp, conspicuity = ctx.amplitude(0.26)
    return Lesion("pleural_effusion", profile, amp * profile,
                  {"side": side, "zone": "lower", "phrase": f"{side} hemithorax"},
                  {"amount": amount, "conspicuity": conspicuity})


def cardiomegaly(ctx: Context) -> Lesion:
    """An enlarged heart: a change of size, not of contrast, so subtlety does not fade it."""
    a = ctx.anatomy
    (cu, cv), ru = a.extras["heart"]
    factor = float(ctx.rng.uniform(1.15, 1.4))
    normal = ellipse(a.u, a.v, cu, cv, ru, 0.85 * ru, 0.05)
    enlarged = ellipse(a.u, a.v, cu, cv, ru * factor, 0.85 * ru * factor, 0.05)
    ctr = round(ru * factor / 0.77, 2)
    severity = "mild" if factor < 1.25 else "moderate"
    heart_level = float(np.median(a.image[normal > 0.9]))
    # the enlarged silhouette lifts whatever is darker than heart tissue (lung) to the heart's level
    return Lesion("cardiomegaly", enlarged, np.maximum(heart_level - a.image, 0.0) * enlarged,
                  {"organ": "heart", "phrase": "cardiac silhouette"}, {"ctr": ctr, "severity": severity})


def pneumothorax(ctx: Context) -> Lesion:
    side = "right" if ctx.rng.random() < 0.5 else "left"
    a = ctx.anatomy
    lung = a.structures[f"{side} lung"]
    collapse = float(ctx.rng.uniform(0.68, 0.9))
    cu = (-0.44 if side == "right" else 0.44) * (1 - 0.15 * (1 - collapse))
    retracted = ellipse(a.u, a.v, cu, 0.05 * (1 - collapse) / 0.3, 0.33 * collapse, 0.75 * collapse, 0.03)
    profile = lung * (1 - retracted)
    amp, conspicuity = ctx.amplitude(0.2)
    pleural_line = 4 * retracted * (1 - retracted) * lung
    delta = -a.extras["markings"] * profile - amp * profile + 1.5 * amp * pleural_line
    return Lesion("pneumothorax", profile, delta, {"side": side, "zone": "apical", "phrase": f"{side} apex"},
                  {"size": "small" if collapse > 0.84 else "moderate", "conspicuity": conspicuity})


CXR_MAKERS: dict[str, Callable[[Context], Lesion]] = {
    "nodule": nodule, "mass": mass, "consolidation": consolidation,
    "pleural_effusion": pleural_effusion, "cardiomegaly": cardiomegaly, "pneumothorax": pneumothorax,
}


def chest_findings(ctx: Context) -> list[Lesion]:
    p = ctx.patient
    smoker = p["smoking_history"] != "never"
    old = p["age"] >= 65
    risks = {
        "nodule": 0.12 + 0.10 * smoker, "mass": 0.04 + 0.06 * smoker, "consolidation": 0.15,
        "cardiomegaly": 0.10 + 0.10 * old, "pleural_effusion": 0.10, "pneumothorax": 0.07,
    }
    present = {name: ctx.rng.random() < risk for name, risk in risks.items()}
    if present["cardiomegaly"] and not present["pleural_effusion"]:
        present["pleural_effusion"] = ctx.rng.random() < 0.3  # heart failure
    return [CXR_MAKERS[name](ctx) for name in CXR_MAKERS if present[name]]


# -- mammography ------------------------------------------------------------------------------------

MASS_SHAPES = ("ROUND", "OVAL", "LOBULATED", "IRREGULAR", "ARCHITECTURAL_DISTORTION")
MASS_MARGINS = ("CIRCUMSCRIBED", "OBSCURED", "ILL_DEFINED", "SPICULATED")
CALC_TYPES = ("PUNCTATE", "ROUND_AND_REGULAR", "AMORPHOUS", "PLEOMORPHIC", "FINE_LINEAR_BRANCHING")
CALC_DISTRIBUTIONS = ("DIFFUSELY_SCATTERED", "REGIONAL", "CLUSTERED", "LINEAR", "SEGMENTAL")
# log-odds of malignancy each descriptor adds (BI-RADS lexicon: spiculated / irregular / fine linear
# branching / segmental are suspicious; circumscribed / round / punctate / diffuse are reassuring)
MALIGNANCY_WEIGHTS = {
    "ROUND": -0.8, "OVAL": -0.8, "LOBULATED": 0.0, "IRREGULAR": 1.2, "ARCHITECTURAL_DISTORTION": 0.8,
    "CIRCUMSCRIBED": -1.6, "OBSCURED": -0.3, "ILL_DEFINED": 0.6, "SPICULATED": 2.0,
    "PUNCTATE": -1.2, "ROUND_AND_REGULAR": -1.5, "AMORPHOUS": 0.2, "PLEOMORPHIC": 1.0, "FINE_LINEAR_BRANCHING": 2.0,
    "DIFFUSELY_SCATTERED": -1.2, "REGIONAL": -0.6, "CLUSTERED": 0.2, "LINEAR": 0.8, "SEGMENTAL": 1.0,
}
MARGIN_EDGE = {"CIRCUMSCRIBED": 1.0, "OBSCURED": 3.0, "ILL_DEFINED": 5.0, "SPICULATED": 1.5}
SHAPE_IRREGULARITY = {"ROUND": 0.0, "OVAL": 0.0, "LOBULATED": 0.14, "IRREGULAR": 0.1, "ARCHITECTURAL_DISTORTION": 0.0}
DOT_RADIUS_PX = {"PUNCTATE": (0.5, 0.8), "ROUND_AND_REGULAR": (0.8, 1.3), "AMORPHOUS": (0.5, 0.9),
                 "PLEOMORPHIC": (0.4, 1.3), "FINE_LINEAR_BRANCHING": (0.4, 0.7)}
CLUSTER_RADIUS_MM = {"CLUSTERED": (3, 8), "LINEAR": (6, 12), "SEGMENTAL": (10, 20),
                     "REGIONAL": (14, 25), "DIFFUSELY_SCATTERED": (20, 30)}


def _mammo_point(ctx: Context) -> tuple[float, float, dict[str, str]]:
    """A point in the breast and its location words (one view shows only one of the two axes)."""
    a, rng = ctx.anatomy, ctx.rng
    upper, outer = rng.random() < 0.6, rng.random() < 0.6  # lesions favour the upper outer quadrant
    shown = outer if a.view == "CC" else upper  # CC: lateral is up; MLO: superior is up
    depth_third = int(rng.integers(0, 3))
    reach = (a.u + 1) / a.extras["depth"]
    region = (a.structures["breast"] > 0.7) & ((a.v < 0) == shown) & (np.floor(reach * 3) == 2 - depth_third)
    if not region.any():
        region = a.structures["breast"] > 0.7
    x, y = sample_point(rng, region)
    quadrant = f"{'upper' if upper else 'lower'} {'outer' if outer else 'inner'}"
    depth = ("anterior", "middle", "posterior")[depth_third]
    side = ctx.patient["left or right breast"].lower()
    return x, y, {"laterality": side, "quadrant": quadrant, "depth": depth,
                  "phrase": f"{side} breast, {quadrant} quadrant, {depth} depth"}


def _pathology(ctx: Context, descriptors: tuple[str, str]) -> str:
    logit = -0.9 + sum(MALIGNANCY_WEIGHTS[d] for d in descriptors) + 0.03 * (ctx.patient["age"] - 55)
    if ctx.rng.random() < 1 / (1 + np.exp(-logit)):
        return "MALIGNANT"
    reassuring = sum(MALIGNANCY_WEIGHTS[d] for d in descriptors) < -1.5
    return "BENIGN_WITHOUT_CALLBACK" if ctx.rng.random() < (0.5 if reassuring else 0.15) else "BENIGN"


def mammo_mass(ctx: Context) -> Lesion:
    rng, size = ctx.rng, ctx.anatomy.frame.size
    shape_name = str(rng.choice(MASS_SHAPES, p=(0.2, 0.25, 0.15, 0.3, 0.1)))
    margin = str(rng.choice(MASS_MARGINS, p=(0.3, 0.15, 0.3, 0.25)))
    x, y, location = _mammo_point(ctx)
    distortion = shape_name == "ARCHITECTURAL_DISTORTION"
    if distortion:  # a distortion has no mass body, so no circumscribed or obscured outline
        margin = str(rng.choice(("ILL_DEFINED", "SPICULATED")))
    spikes = ()
    if margin == "SPICULATED" or distortion:
        spikes = tuple((float(t), float(rng.uniform(0.8, 1.8))) for t in rng.uniform(0, 2 * np.pi, rng.integers(8, 16)))
    shape = ctx.shape(
        x, y, rng.uniform(4.0, 14.0) * (0.6 if distortion else 1.0), SHAPE_IRREGULARITY[shape_name],
        aspect=float(rng.uniform(1.4, 2.0)) if shape_name == "OVAL" else float(rng.uniform(1.0, 1.15)),
        spikes=spikes, sharpness=80.0, edge=MARGIN_EDGE[margin] * ctx.anatomy.edge_px, core=1.0 if distortion else 0.0,
    )
    profile = draw(shape, size) * (ctx.anatomy.structures["breast"] > 0)
    amp, conspicuity = ctx.amplitude(0.22)
    attributes = {"mass shape": shape_name, "mass margins": margin, "conspicuity": conspicuity,
                  "pathology": _pathology(ctx, (shape_name, margin))}
    return Lesion("mass", profile, amp * profile, location, attributes)


def mammo_calcification(ctx: Context) -> Lesion:
    rng, size = ctx.rng, ctx.anatomy.frame.size
    kind = str(rng.choice(CALC_TYPES, p=(0.2, 0.15, 0.2, 0.3, 0.15)))
    distribution = str(rng.choice(CALC_DISTRIBUTIONS, p=(0.05, 0.1, 0.55, 0.15, 0.15)))
    x, y, location = _mammo_point(ctx)
    low, high = CLUSTER_RADIUS_MM[distribution]
    elongated = distribution in ("LINEAR", "SEGMENTAL")
    envelope_shape = ctx.shape(x, y, rng.uniform(low, high), aspect=float(rng.uniform(3.0, 5.0)) if elongated else 1.1,
                               edge=2.0)
    envelope = draw(envelope_shape, size) * (ctx.anatomy.structures["breast"] > 0)
    count = int(rng.integers(6, 30))
    centres = np.array([sample_point(rng, envelope > 0.9) for _ in range(count)]) if (envelope > 0.9).any() \
        else np.array([[x, y]])
    if kind == "FINE_LINEAR_BRANCHING":  # short linear runs of dots
        steps = rng.normal(0, 1.2, size=(len(centres), 2))
        centres = np.concatenate([centres, centres + steps, centres + 2 * steps])
    radii = rng.uniform(*DOT_RADIUS_PX[kind], size=len(centres)) * size / 256
    dots = stamp_dots(size, centres, np.maximum(radii, 0.35)) * (envelope > 0)
    amp, conspicuity = ctx.amplitude(0.45 if kind != "AMORPHOUS" else 0.25)
    attributes = {"calc type": kind, "calc distribution": distribution, "conspicuity": conspicuity,
                  "pathology": _pathology(ctx, (kind, distribution)), "count": len(centres)}
    return Lesion("calcification", envelope, amp * dots, location, attributes)


def mammo_findings(ctx: Context) -> list[Lesion]:
    count = int(ctx.rng.choice(3, p=(0.3, 0.55, 0.15)))
    return [(mammo_mass if ctx.rng.random() < 0.55 else mammo_calcification)(ctx) for _ in range(count)]


# -- abdominal CT -----------------------------------------------------------------------------------

def liver_lesion(ctx: Context) -> Lesion:
    liver = ctx.anatomy.structures["liver"]
    x, y = sample_point(ctx.rng, liver > 0.9)
    enhancement = str(ctx.rng.choice(("none", "rim")))
    profile = draw(ctx.shape(x, y, ctx.rng.uniform(4.0, 18.0), irregularity=0.05), ctx.anatomy.frame.size) * liver
    amp, conspicuity = ctx.amplitude(-0.24)
    delta = amp * profile + (0.5 * abs(amp) * 4 * profile * (1 - profile) if enhancement == "rim" else 0.0)
    u, _ = ctx.where(x, y)
    lobe = "right" if u < -0.3 else "left"
    return Lesion("liver_lesion", profile, delta, {"organ": "liver", "lobe": f"{lobe} lobe", "phrase": f"{lobe} hepatic lobe"},
                  {"density": "hypodense", "enhancement": enhancement, "conspicuity": conspicuity})


def renal_cyst(ctx: Context) -> Lesion:
    side = "right" if ctx.rng.random() < 0.5 else "left"
    kidney = ctx.anatomy.structures[f"{side} kidney"]
    x, y = sample_point(ctx.rng, (kidney > 0.3) & (kidney < 0.95))
    profile = draw(ctx.shape(x, y, ctx.rng.uniform(4.0, 12.0), aspect=1.0), ctx.anatomy.frame.size)
    amp, conspicuity = ctx.amplitude(-0.3)
    u, _ = ctx.where(x, y)
    aspect = "lateral" if abs(u) > 0.33 else "medial"
    return Lesion("renal_cyst", profile, amp * profile,
                  {"organ": "kidney", "side": side, "aspect": aspect, "phrase": f"{aspect} {side} kidney"},
                  {"density": "fluid", "bosniak": str(ctx.rng.choice(("I", "II"))), "conspicuity": conspicuity})


def ct_findings(ctx: Context) -> list[Lesion]:
    lesions = []
    if ctx.rng.random() < 0.35 + 0.2 * ctx.patient["cancer_history"]:
        lesions += [liver_lesion(ctx) for _ in range(int(ctx.rng.integers(1, 4)))]
    if ctx.rng.random() < 0.3 + 0.004 * max(0, ctx.patient["age"] - 50):
        lesions.append(renal_cyst(ctx))
    return lesions


# -- brain MR ---------------------------------------------------------------------------------------

SIGNAL = {"T1": -1.0, "T2": 1.0, "FLAIR": 1.0}  # sign of oedema / tumour signal per sequence


def _brain_location(ctx: Context, x: float, y: float) -> dict[str, str]:
    u, v = ctx.where(x, y)
    side = "right" if u < 0 else "left"
    lobe = "frontal" if v < -0.35 else "occipital" if v > 0.5 else "temporal" if abs(u) > 0.42 else "parietal"
    return {"side": side, "lobe": f"{lobe} lobe", "phrase": f"{side} {lobe} lobe"}


def tumor(ctx: Context) -> Lesion:
    a = ctx.anatomy
    x, y = sample_point(ctx.rng, a.structures["brain"] > 0.95)
    size = a.frame.size
    core_shape = ctx.shape(x, y, ctx.rng.uniform(6.0, 18.0), irregularity=0.1)
    core = draw(core_shape, size)
    oedema = draw(Shape(x, y, core_shape.radius * 1.8, core_shape.aspect, core_shape.angle, core_shape.harmonics,
                        edge=3 * a.edge_px), size) * a.structures["brain"]
    profile = np.maximum(core, oedema)
    amp, conspicuity = ctx.amplitude(0.3 * SIGNAL[a.extras["sequence"]])
    delta = amp * (core + 0.5 * oedema * (1 - core))
    return Lesion("tumor", profile, delta, _brain_location(ctx, x, y),
                  {"oedema": True, "enhancement": str(ctx.rng.choice(("ring", "solid"))), "conspicuity": conspicuity})


def infarct(ctx: Context) -> Lesion:
    a = ctx.anatomy
    radial = np.sqrt((a.u / 0.69) ** 2 + (a.v / 0.86) ** 2)
    x, y = sample_point(ctx.rng, (a.structures["brain"] > 0.9) & (radial > 0.55) & (radial < 0.85))
    cx, cy = a.frame.to_pixels(0.0, 0.0)
    shape = Shape(x, y, ctx.mm(ctx.rng.uniform(6.0, 16.0)), aspect=2.0, angle=float(np.arctan2(y - cy, x - cx)) + np.pi / 2,
                  harmonics=((3, 0.08, float(ctx.rng.uniform(0, 6.28))),), edge=a.edge_px)
    profile = draw(shape, a.frame.size) * a.structures["brain"]
    amp, conspicuity = ctx.amplitude(0.25 * SIGNAL[a.extras["sequence"]])
    location = _brain_location(ctx, x, y)
    territory = {"frontal lobe": "ACA", "occipital lobe": "PCA"}.get(location["lobe"], "MCA")
    return Lesion("infarct", profile, amp * profile, location,
                  {"territory": territory, "stage": str(ctx.rng.choice(("acute", "chronic"))), "conspicuity": conspicuity})


def mr_findings(ctx: Context) -> list[Lesion]:
    lesions = []
    if ctx.rng.random() < 0.3 + 0.2 * ctx.patient["cancer_history"]:
        lesions.append(tumor(ctx))
    if ctx.rng.random() < 0.25 + 0.005 * max(0, ctx.patient["age"] - 50):
        lesions.append(infarct(ctx))
    return lesions


SAMPLERS: dict[str, Callable[[Context], list[Lesion]]] = {
    "cxr": chest_findings, "mammo": mammo_findings, "ct": ct_findings, "mr": mr_findings,
}


def make_findings(modality: str, rng: np.random.Generator, anatomy: Anatomy, patient: Patient,
                  knobs: PhantomKnobs, spacing_mm: float) -> tuple[list[Finding], np.ndarray]:
    """The patient's findings and the summed intensity change they make (zero outside their masks)."""
    ctx = Context(rng, anatomy, patient, 1.0 - knobs.subtlety, spacing_mm)
    total = np.zeros_like(anatomy.image)
    findings = []
    for lesion in SAMPLERS[modality](ctx):
        mask = lesion.profile > 0
        box = mask_box(mask)
        if box is None:  # drawn entirely off the image; the patient does not have it after all
            continue
        total += np.where(mask, lesion.delta, 0.0).astype(np.float32)
        size_mm = round(max(box[2] - box[0], box[3] - box[1]) * spacing_mm, 1)
        attributes = {key: (round(value, 3) if isinstance(value, float) else value) for key, value in lesion.attributes.items()}
        findings.append(Finding(lesion.label, mask, box, lesion.location, size_mm, attributes))
    return findings, total
