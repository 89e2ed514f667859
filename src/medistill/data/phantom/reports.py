"""Free-text reports written from the true findings, the way radiologists write them: varied words,
hedged mentions, explicit negations, sentences about devices and technique, and findings left out.

`write_report` returns the text and, per label, how the report mentions it (what a report labeler
such as CheXpert's would read off): "positive", "uncertain" (hedged), "negative" (negated) or absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medistill.data.phantom.findings import Finding
from medistill.data.phantom.knobs import PhantomKnobs
from medistill.data.phantom.tables import Row


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _mm(finding: Finding) -> str:
    return f"{max(1, round(finding.size_mm))} mm"


# -- how each finding is named: a noun phrase without article, and whether it takes "a" ---------------

Describer = Callable[[Finding, np.random.Generator], tuple[str, bool]]


def _lung_lesion(noun: tuple[str, ...]) -> Describer:
    def describe(f: Finding, rng: np.random.Generator) -> tuple[str, bool]:
        where = _pick(rng, (f"the {f.location['phrase']}", f"the {f.location['lobe']}"))
        margin = f"{f.attributes['margin']} " if "margin" in f.attributes else ""
        return f"{_mm(f)} {margin}{_pick(rng, noun)} in {where}", True
    return describe


DESCRIBERS: dict[str, Describer] = {
    "nodule": _lung_lesion(("nodule", "nodular opacity", "rounded density")),
    "mass": _lung_lesion(("mass", "mass lesion")),
    "consolidation": lambda f, rng: (
        f"{_pick(rng, ('consolidation', 'airspace opacity', 'airspace disease'))} in the {f.location['lobe']}"
        + (" with air bronchograms" if f.attributes["air_bronchograms"] else ""), False),
    "pleural_effusion": lambda f, rng: (
        f"{f.attributes['amount']} {f.location['side']} {_pick(rng, ('pleural effusion', 'pleural fluid collection'))}", True),
    "cardiomegaly": lambda f, rng: (
        _pick(rng, (f"{f.attributes['severity']} cardiomegaly", f"{f.attributes['severity']} enlargement of the cardiac silhouette",
                    f"cardiomegaly (cardiothoracic ratio about {f.attributes['ctr']:.2f})")), False),
    "pneumothorax": lambda f, rng: (f"{f.attributes['size']} {f.location['side']} apical pneumothorax", True),
    "liver_lesion": lambda f, rng: (
        f"{_mm(f)} {_pick(rng, ('hypodense', 'low-attenuation'))} {_pick(rng, ('lesion', 'focus'))} in the {f.location['phrase']}"
        + (" with peripheral rim enhancement" if f.attributes["enhancement"] == "rim" else ""), True),
    "renal_cyst": lambda f, rng: (
        f"{_mm(f)} {_pick(rng, ('simple cyst', 'fluid-attenuation cyst'))} in the {f.location['phrase']} (Bosniak {f.attributes['bosniak']})", True),
    "tumor": lambda f, rng: (
        f"{_mm(f)} {f.attributes['enhancement']}-enhancing {_pick(rng, ('mass', 'intra-axial mass'))} in the {f.location['phrase']}"
        " with surrounding vasogenic edema", True),
    "infarct": lambda f, rng: (
        f"{f.attributes['stage']} {f.location['side']} {f.attributes['territory']} territory infarct in the {f.location['lobe']}", True),
}


def _mammo_describe(f: Finding, rng: np.random.Generator) -> tuple[str, bool]:
    words = {key: str(value).lower().replace("_", " ") for key, value in f.attributes.items()}
    where = f.location["phrase"].split(", ", 1)[1]
    if f.label == "mass":
        if f.attributes["mass shape"] == "ARCHITECTURAL_DISTORTION":
            return f"architectural distortion in the {where}", False
        return f"{_mm(f)} {words['mass shape']} mass with {words['mass margins']} margins in the {where}", True
    return f"{words['calc distribution']} {words['calc type']} calcifications in the {where}", False


# -- what a report says besides the findings ---------------------------------------------------------

@dataclass(frozen=True)
class Style:
    exam: Callable[[Row, str], str]
    technique: tuple[str, ...]
    negations: dict[str, tuple[str, ...]]
    irrelevant: tuple[str, ...]
    normal_impression: tuple[str, ...]


STYLES: dict[str, Style] = {
    "cxr": Style(
        exam=lambda row, view: f"CHEST ({view})",
        technique=("Single frontal view of the chest.", "{view} radiograph of the chest.", "Portable {view} chest radiograph."),
        negations={
            "nodule": ("No suspicious pulmonary nodule is identified.", "No focal nodular opacity."),
            "mass": ("No mass lesion.", "No pulmonary mass is seen."),
            "consolidation": ("No focal consolidation.", "The lungs are clear without consolidation.", "No airspace opacity to suggest pneumonia."),
            "pleural_effusion": ("No pleural effusion.", "There is no pleural effusion.", "Costophrenic angles are sharp."),
            "cardiomegaly": ("Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.", "No cardiomegaly."),
            "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
        },
        irrelevant=("A right-sided PICC line terminates in the mid SVC.", "Sternotomy wires are intact.",
                    "Degenerative changes of the thoracic spine.", "The osseous structures are unremarkable.",
                    "Surgical clips project over the upper abdomen.", "Old healed right rib fracture.",
                    "Hilar contours are unremarkable.", "Overlying EKG leads."),
        normal_impression=("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.",
                           "Normal chest radiograph."),
    ),
    "mammo": Style(
        exam=lambda row, view: f"{row['left or right breast']} {view} DIGITAL MAMMOGRAM",
        technique=("Standard digital {view} view.", "Digital {view} view with CAD review."),
        negations={
            "mass": ("No suspicious mass.", "No dominant mass is identified."),
            "calcification": ("No suspicious calcifications.", "No suspicious microcalcifications."),
        },
        irrelevant=("Scattered benign-appearing vascular calcifications.", "Skin and nipple are unremarkable.",
                    "A skin marker denotes a mole.", "Axillary lymph nodes of normal morphology."),
        normal_impression=("No mammographic evidence of malignancy.", "Negative mammogram."),
    ),
    "ct": Style(
        exam=lambda row, view: "CT ABDOMEN WITH CONTRAST",
        technique=("Axial images of the abdomen after intravenous contrast in the portal venous phase.",
                   "Contrast-enhanced axial CT of the abdomen."),
        negations={
            "liver_lesion": ("The liver is normal in size without focal lesion.", "No focal hepatic lesion."),
            "renal_cyst": ("The kidneys enhance symmetrically without focal lesion.", "No renal mass or cyst."),
        },
        irrelevant=("The pancreas and adrenal glands are unremarkable.", "Atherosclerotic calcification of the aorta.",
                    "No free intraperitoneal air.", "Degenerative changes of the lumbar spine.",
                    "The gallbladder is unremarkable.", "Bowel loops are normal in caliber."),
        normal_impression=("No acute abdominal abnormality.", "Unremarkable CT of the abdomen."),
    ),
    "mr": Style(
        exam=lambda row, view: f"MRI BRAIN ({row['sequence']})",
        technique=("Axial {sequence} images of the brain.", "Multiplanar MR imaging of the brain; axial {sequence} shown."),
        negations={
            "tumor": ("No intracranial mass.", "No mass effect or midline shift."),
            "infarct": ("No evidence of acute infarct.", "No territorial infarct."),
        },
        irrelevant=("Mild mucosal thickening of the maxillary sinuses.", "The orbits are unremarkable.",
                    "Scattered nonspecific white matter hyperintensities, likely microangiopathic.",
                    "The major intracranial flow voids are preserved.", "Motion artifact limits evaluation."),
        normal_impression=("No acute intracranial abnormality.", "Unremarkable MRI of the brain."),
    ),
}

POSITIVE = ("There is {a}{p}.", "{A}{p} is seen.", "{A}{p} is noted.", "Redemonstration of {a}{p}.")
HEDGED = ("Possible {p}.", "{A}{p} cannot be excluded.", "There may be {a}{p}.", "Findings could represent {a}{p}.",
          "Questionable {p}.")
BIRADS_WORDS = {0: "incomplete, needs additional imaging", 1: "negative", 2: "benign", 3: "probably benign",
                4: "suspicious", 5: "highly suggestive of malignancy"}


def _sentence(template: str, phrase: str, countable: bool) -> str:
    article = ("an " if phrase[0] in "aeiou8" else "a ") if countable else ""
    text = template.format(a=article, A=article.capitalize(), p=phrase)
    return text[0].upper() + text[1:]


def write_report(modality: str, rng: np.random.Generator, findings: list[Finding], row: Row, view: str,
                 knobs: PhantomKnobs, labels: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    style = STYLES[modality]
    describe = _mammo_describe if modality == "mammo" else lambda f, r: DESCRIBERS[f.label](f, r)
    mentions: dict[str, str] = {}
    body: list[str] = []
    impression: list[str] = []
    for finding in findings:
        if rng.random() >= knobs.report_completeness:
            continue
        phrase, countable = describe(finding, rng)
        hedged = rng.random() < knobs.hedging
        body.append(_sentence(_pick(rng, HEDGED if hedged else POSITIVE), phrase, countable))
        impression.append(_sentence("Possible {p}." if hedged else "{A}{p}.", phrase, countable))
        status = "uncertain" if hedged else "positive"
        if mentions.get(finding.label) != "positive":
            mentions[finding.label] = status
    present = {f.label for f in findings}
    for label in labels:
        if label not in present and rng.random() < 0.6:
            body.append(_pick(rng, style.negations[label]))
            mentions[label] = "negative"
    order = rng.permutation(len(body))
    body = [body[i] for i in order]
    extra = [str(s) for s in rng.choice(style.irrelevant, size=int(rng.integers(1, 3)), replace=False)]
    body = extra[:1] + body + extra[1:]
    if modality == "mammo":
        density = "ABCD"[int(row["breast_density"]) - 1]
        body.insert(0, f"Breast composition: category {density}.")
        impression.append(f"BI-RADS {row['assessment']}: {BIRADS_WORDS[int(row['assessment'])]}.")
    if not [s for s in impression if not s.startswith("BI-RADS")]:
        impression.insert(0, _pick(rng, style.normal_impression))
    fill = {"view": view, "sequence": row.get("sequence", "")}
    indication = row.get("symptoms") or row.get("indication") or "screening"
    sex = "woman" if row.get("sex", "F") == "F" else "man"
    lines = [
        "                                 FINAL REPORT",
        f" EXAMINATION:  {style.exam(row, view)}",
        "",
        f" INDICATION:  ___-year-old {sex} with {indication.replace('none', 'routine evaluation')}.",
        "",
        f" TECHNIQUE:  {_pick(rng, style.technique).format(**fill)}",
        "",
        f" COMPARISON:  {_pick(rng, ('None.', 'Prior study from ___.', '___.'))}",
        "",
        " FINDINGS:",
        "",
        " " + " ".join(body),
        "",
        " IMPRESSION:",
        "",
        " " + " ".join(impression),
        "",
    ]
    return "\n".join(lines), mentions
