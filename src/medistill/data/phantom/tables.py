"""The clinical table: demographics drawn before the findings (they set the risks), and the rest of
the row (symptoms, vital signs, labs; for mammography the CBIS-DDSM descriptors) drawn from them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from medistill.data.phantom.anatomy import Patient
from medistill.data.phantom.findings import Finding

Row = dict[str, Any]


def _age(rng: np.random.Generator, mean: float, sd: float) -> int:
    return int(np.clip(round(rng.normal(mean, sd)), 18, 95))


def _maybe(rng: np.random.Generator, value: Any, missing: float = 0.05) -> Any:
    """Real tables have holes: a value goes missing with a small probability."""
    return None if rng.random() < missing else value


def sample_patient(modality: str, rng: np.random.Generator) -> Patient:
    """Who the patient is; everything here may influence which findings they have."""
    sex = "F" if modality == "mammo" or rng.random() < 0.5 else "M"
    patient: Patient = {"sex": sex}
    if modality == "cxr":
        patient["age"] = _age(rng, 60, 15)
        patient["smoking_history"] = str(rng.choice(("never", "former", "current"), p=(0.5, 0.3, 0.2)))
        years = 0.0 if patient["smoking_history"] == "never" else rng.uniform(5, 20 + 0.5 * (patient["age"] - 18))
        patient["pack_years"] = round(float(years), 1)
    elif modality == "mammo":
        patient["age"] = _age(rng, 58, 11)
        young = patient["age"] < 50
        patient["breast_density"] = int(rng.choice((1, 2, 3, 4), p=(0.05, 0.3, 0.45, 0.2) if young else (0.15, 0.45, 0.3, 0.1)))
        patient["left or right breast"] = "LEFT" if rng.random() < 0.5 else "RIGHT"
        patient["image view"] = "CC" if rng.random() < 0.5 else "MLO"
    else:
        patient["age"] = _age(rng, 55, 16)
        patient["cancer_history"] = bool(rng.random() < 0.25)
        if modality == "mr":
            patient["sequence"] = str(rng.choice(("T1", "T2", "FLAIR")))
    return patient


def _symptoms(rng: np.random.Generator, odds: dict[str, float]) -> str:
    chosen = [name for name, p in odds.items() if rng.random() < p]
    return "; ".join(chosen) if chosen else "none"


def chest_row(rng: np.random.Generator, patient: Patient, view: str, labels: set[str], findings: list[Finding]) -> Row:
    consolidation = "consolidation" in labels
    temperature = rng.normal(38.4, 0.6) if consolidation else rng.normal(36.9, 0.4)
    spo2 = 97 - 3 * consolidation - 2 * ("pleural_effusion" in labels) - 4 * ("pneumothorax" in labels) + rng.normal(0, 1.2)
    symptoms = _symptoms(rng, {
        "cough": 0.8 if consolidation else 0.4 if labels & {"nodule", "mass"} else 0.15,
        "dyspnea": 0.75 if labels & {"pleural_effusion", "pneumothorax"} else 0.5 if "cardiomegaly" in labels else 0.1,
        "fever": 0.9 if temperature > 38 else 0.02,
        "chest pain": 0.7 if "pneumothorax" in labels else 0.05,
        "hemoptysis": 0.3 if "mass" in labels else 0.01,
    })
    return {
        "age": patient["age"], "sex": patient["sex"], "view": view,
        "smoking_history": patient["smoking_history"], "pack_years": _maybe(rng, patient["pack_years"]),
        "symptoms": symptoms,
        "temperature_c": _maybe(rng, round(float(temperature), 1)),
        "wbc_k_per_ul": _maybe(rng, round(float(rng.normal(13.5, 3.0) if consolidation else rng.normal(7.5, 2.0)), 1)),
        "spo2_percent": _maybe(rng, int(np.clip(round(spo2), 80, 100))),
        "heart_failure_history": "yes" if rng.random() < (0.6 if "cardiomegaly" in labels else 0.08) else "no",
    }


# BI-RADS assessment given pathology: it nearly gives the pathology away, as in CBIS-DDSM
ASSESSMENT = {
    "MALIGNANT": ((5, 4, 3, 0), (0.6, 0.37, 0.02, 0.01)),
    "BENIGN": ((4, 3, 2, 0), (0.3, 0.35, 0.3, 0.05)),
    "BENIGN_WITHOUT_CALLBACK": ((2, 3, 0), (0.7, 0.2, 0.1)),
}


def assess(rng: np.random.Generator, finding: Finding) -> None:
    """Add the radiologist's BI-RADS assessment and subtlety rating (1 subtle .. 5 obvious) to a mammogram finding."""
    values, probabilities = ASSESSMENT[finding.attributes["pathology"]]
    finding.attributes["assessment"] = int(rng.choice(values, p=probabilities))
    conspicuity = finding.attributes["conspicuity"]
    finding.attributes["subtlety"] = int(np.clip(round(1 + 4 * (conspicuity - 0.6) / 0.8 + rng.normal(0, 0.5)), 1, 5))


CBIS_DESCRIPTORS = {"mass": ("mass shape", "mass margins"), "calcification": ("calc type", "calc distribution")}


def cbis_row(patient: Patient, finding: Finding, abnormality_id: int) -> Row:
    """One CBIS-DDSM case-description row (without the file paths) for one abnormality."""
    row: Row = {
        "patient_id": patient["patient_id"],
        "breast_density": patient["breast_density"],
        "left or right breast": patient["left or right breast"],
        "image view": patient["image view"],
        "abnormality id": abnormality_id,
        "abnormality type": finding.label,
    }
    for column in CBIS_DESCRIPTORS[finding.label]:
        row[column] = finding.attributes[column]
    for column in ("assessment", "pathology", "subtlety"):
        row[column] = finding.attributes[column]
    return row


def mammo_row(rng: np.random.Generator, patient: Patient, view: str, labels: set[str], findings: list[Finding]) -> Row:
    """The image's table row: the CBIS columns of its most suspicious abnormality (blank when normal)."""
    for finding in findings:
        assess(rng, finding)
    if not findings:
        return {"patient_id": patient["patient_id"], "breast_density": patient["breast_density"],
                "left or right breast": patient["left or right breast"], "image view": patient["image view"],
                "abnormality id": None, "abnormality type": None, "assessment": 1, "pathology": None, "subtlety": None}
    ranked = sorted(range(len(findings)), key=lambda i: (-findings[i].attributes["assessment"], i))
    return cbis_row(patient, findings[ranked[0]], ranked[0] + 1)


def ct_row(rng: np.random.Generator, patient: Patient, view: str, labels: set[str], findings: list[Finding]) -> Row:
    liver = "liver_lesion" in labels
    indication = "cancer staging" if patient["cancer_history"] else str(rng.choice(
        ("abdominal pain", "elevated liver enzymes" if liver and rng.random() < 0.5 else "weight loss", "hematuria")))
    return {
        "age": patient["age"], "sex": patient["sex"], "contrast_phase": "portal venous", "indication": indication,
        "alt_u_per_l": _maybe(rng, int(max(8, rng.normal(70 if liver else 28, 15)))),
        "creatinine_mg_dl": _maybe(rng, round(float(max(0.4, rng.normal(1.0, 0.25))), 2)),
        "cancer_history": "yes" if patient["cancer_history"] else "no",
    }


def mr_row(rng: np.random.Generator, patient: Patient, view: str, labels: set[str], findings: list[Finding]) -> Row:
    acute = any(f.label == "infarct" and f.attributes["stage"] == "acute" for f in findings)
    symptoms = _symptoms(rng, {
        "headache": 0.7 if "tumor" in labels else 0.3,
        "seizure": 0.35 if "tumor" in labels else 0.05,
        "focal weakness": 0.8 if acute else 0.2 if "infarct" in labels else 0.05,
        "speech disturbance": 0.5 if acute else 0.03,
    })
    onset = rng.uniform(1, 24) if acute else rng.uniform(24, 24 * 60)
    return {
        "age": patient["age"], "sex": patient["sex"], "sequence": patient["sequence"], "symptoms": symptoms,
        "symptom_onset_hours": _maybe(rng, round(float(onset), 1)),
        "cancer_history": "yes" if patient["cancer_history"] else "no",
    }


ROW_MAKERS: dict[str, Callable[[np.random.Generator, Patient, str, set[str], list[Finding]], Row]] = {
    "cxr": chest_row, "mammo": mammo_row, "ct": ct_row, "mr": mr_row,
}
