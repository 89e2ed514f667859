"""The public datasets' on-disk layouts, filled from phantom cases.

Each layout collects what it needs case by case (`add`) and writes its index files at the end
(`finish`); image files go through `Files`, which stores each image's bytes once and hard-links
further copies (falling back to a copy where links are not possible).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medistill.data.phantom.case import PhantomCase
from medistill.data.phantom.grounding import grid_box
from medistill.data.phantom.spec import CXR_FINDINGS, SPECS
from medistill.data.phantom.tables import cbis_row


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless, deterministic PNG (Pillow writes no time or metadata chunks unless asked)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


class Files:
    """Writes files under `root`; the same bytes written twice become a hard link to the first copy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._first: dict[bytes, Path] = {}

    def write(self, relative: str, data: bytes | str) -> str:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = data.encode("utf-8") if isinstance(data, str) else data
        key = hashlib.sha1(payload).digest() if len(payload) > 4096 else None
        first = self._first.get(key) if key else None
        if first is not None:
            try:
                os.link(first, path)
                return relative
            except OSError:
                pass
        path.write_bytes(payload)
        if key:
            self._first.setdefault(key, path)
        return relative

    def json(self, relative: str, value: Any) -> str:
        return self.write(relative, json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False) + "\n")

    def csv(self, relative: str, columns: list[str], rows: list[dict[str, Any]]) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
        return self.write(relative, buffer.getvalue())


def _uid(*parts: object) -> str:
    """A DICOM-like UID, stable for the same parts."""
    digits = str(int(hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest(), 16))[:30]
    return f"1.3.6.1.4.1.9590.100.1.2.{digits}"


# -- MIMIC-CXR-JPG + reports + MS-CXR ---------------------------------------------------------------

CHEXPERT_COLUMNS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                    "Pneumothorax", "Support Devices"]
CHEXPERT_OF = {"nodule": "Lung Lesion", "mass": "Lung Lesion", "consolidation": "Consolidation",
               "pleural_effusion": "Pleural Effusion", "cardiomegaly": "Cardiomegaly", "pneumothorax": "Pneumothorax"}
MENTION_VALUE = {"positive": 1.0, "uncertain": -1.0, "negative": 0.0}
MS_CXR_CATEGORY = {"nodule": "Nodule", "mass": "Mass", "consolidation": "Consolidation",
                   "pleural_effusion": "Pleural effusion", "cardiomegaly": "Cardiomegaly", "pneumothorax": "Pneumothorax"}
MIMIC_SPLIT = {"train": "train", "val": "validate", "test": "test"}


def chexpert_row(case: PhantomCase) -> dict[str, Any]:
    """What a report labeler reads: 1.0 stated, -1.0 hedged, 0.0 negated, blank not mentioned."""
    rank = {"positive": 3, "uncertain": 2, "negative": 1}
    row: dict[str, Any] = {}
    for label, mention in case.mentions.items():
        column = CHEXPERT_OF[label]
        if column not in row or rank[mention] > rank[row[column]]:
            row[column] = mention
    values: dict[str, Any] = {column: MENTION_VALUE[mention] for column, mention in row.items()}
    if not any(value in (1.0, -1.0) for value in values.values()):
        values["No Finding"] = 1.0
    return values


class MimicCxr:
    name = "mimic-cxr"

    def __init__(self, files: Files) -> None:
        self.files = files
        self.metadata: list[dict[str, Any]] = []
        self.chexpert: list[dict[str, Any]] = []
        self.native: list[dict[str, Any]] = []
        self.splits: list[dict[str, Any]] = []
        self.boxes: list[dict[str, Any]] = []

    def add(self, case: PhantomCase, image: bytes) -> dict[str, str]:
        subject, study, dicom = case.ids["patient_id"], case.ids["study_id"], case.ids["dicom_id"]
        folder = f"files/p{subject[:2]}/p{subject}"
        relative = f"{folder}/s{study}/{dicom}.png"
        self.files.write(f"{self.name}/{relative}", image)
        self.files.write(f"{self.name}/{folder}/s{study}.txt", case.report)
        size = case.image.shape[0]
        date = datetime.date(2150, 1, 1) + datetime.timedelta(days=case.index)
        ap = case.view == "AP"
        self.metadata.append({
            "dicom_id": dicom, "subject_id": subject, "study_id": study,
            "PerformedProcedureStepDescription": "CHEST (PORTABLE AP)" if ap else "CHEST (PA AND LAT)",
            "ViewPosition": case.view, "Rows": size, "Columns": size, "StudyDate": date.strftime("%Y%m%d"),
            "StudyTime": f"{(case.index * 7919) % 240000:06d}.000",
            "ProcedureCodeSequence_CodeMeaning": "CHEST (PORTABLE AP)" if ap else "CHEST (PA AND LAT)",
            "ViewCodeSequence_CodeMeaning": "antero-posterior" if ap else "postero-anterior",
            "PatientOrientationCodeSequence_CodeMeaning": "Recumbent" if ap else "Erect",
        })
        ids = {"subject_id": subject, "study_id": study}
        self.chexpert.append({**ids, **chexpert_row(case)})
        self.native.append({"dicom_id": dicom, **ids, "split": MIMIC_SPLIT[case.split], **case.labels})
        self.splits.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": MIMIC_SPLIT[case.split]})
        for finding in case.findings:
            x1, y1, x2, y2 = finding.box
            self.boxes.append({
                "dicom_id": dicom, "category_name": MS_CXR_CATEGORY[finding.label],
                "label_text": f"{finding.label.replace('_', ' ')} in the {finding.location['phrase']}",
                "path": relative, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1,
                "image_width": size, "image_height": size, "split": case.split,
            })
        return {self.name: f"{self.name}/{relative}"}

    def finish(self) -> None:
        base = f"{self.name}/mimic-cxr-2.0.0"
        self.files.csv(f"{base}-metadata.csv", list(self.metadata[0]) if self.metadata else ["dicom_id"], self.metadata)
        self.files.csv(f"{base}-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_COLUMNS], self.chexpert)
        self.files.csv(f"{base}-split.csv", ["dicom_id", "study_id", "subject_id", "split"], self.splits)
        self.files.csv(f"{self.name}/phantom-labels.csv", ["dicom_id", "subject_id", "study_id", "split", *CXR_FINDINGS], self.native)
        self.files.csv(f"{self.name}/ms-cxr-boxes.csv", ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                                                          "image_width", "image_height", "split"], self.boxes)


# -- CBIS-DDSM ---------------------------------------------------------------------------------------

CBIS_COLUMNS = {
    "mass": ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id", "abnormality type",
             "mass shape", "mass margins", "assessment", "pathology", "subtlety", "image file path",
             "cropped image file path", "ROI mask file path"],
    "calcification": ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
                      "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
                      "image file path", "cropped image file path", "ROI mask file path"],
}
CBIS_PREFIX = {"mass": "Mass", "calcification": "Calc"}
CBIS_FILE = {"mass": "mass_case_description", "calcification": "calc_case_description"}


class CbisDdsm:
    """One row per abnormality; normal mammograms have no place in CBIS-DDSM and are left out."""

    name = "cbis-ddsm"

    def __init__(self, files: Files) -> None:
        self.files = files
        self.rows: dict[tuple[str, str], list[dict[str, Any]]] = {
            (kind, part): [] for kind in CBIS_COLUMNS for part in ("train", "test")}

    def add(self, case: PhantomCase, image: bytes) -> dict[str, str]:
        part = "test" if case.split == "test" else "train"
        paths = {}
        for number, finding in enumerate(case.findings, start=1):
            folder = (f"{CBIS_PREFIX[finding.label]}-{'Test' if part == 'test' else 'Training'}_"
                      f"{case.ids['patient_id']}_{case.table['left or right breast']}_{case.table['image view']}")
            full = f"{folder}/{_uid(case.uid, folder, 'study')}/{_uid(case.uid, folder, 'series')}/000000.png"
            roi = f"{folder}_{number}/{_uid(case.uid, folder, number, 'study')}/{_uid(case.uid, folder, number, 'series')}"
            self.files.write(f"{self.name}/{full}", image)
            self.files.write(f"{self.name}/{roi}/000001.png", png_bytes(finding.mask.astype(np.uint8) * 255))
            x1, y1, x2, y2 = finding.box
            pad = 4
            crop = case.image[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad]
            self.files.write(f"{self.name}/{roi}/000000.png", png_bytes(np.ascontiguousarray(crop)))
            row = cbis_row(case.table, finding, number)
            row["breast density"] = row["breast_density"]
            row.update({"image file path": full, "cropped image file path": f"{roi}/000000.png",
                        "ROI mask file path": f"{roi}/000001.png"})
            self.rows[finding.label, part].append(row)
            paths.setdefault(self.name, f"{self.name}/{full}")
        return paths

    def finish(self) -> None:
        for (kind, part), rows in self.rows.items():
            self.files.csv(f"{self.name}/{CBIS_FILE[kind]}_{part}_set.csv", CBIS_COLUMNS[kind], rows)


# -- VQA-RAD -----------------------------------------------------------------------------------------

class VqaRad:
    name = "vqa-rad"
    image_folder = "VQA_RAD Image Folder"

    def __init__(self, files: Files, seed: int) -> None:
        self.files = files
        self.seed = seed
        self.entries: list[dict[str, Any]] = []

    def add(self, case: PhantomCase, image: bytes) -> dict[str, str]:
        image_name = f"phantom_{case.uid}.png"
        self.files.write(f"{self.name}/{self.image_folder}/{image_name}", image)
        test = case.split == "test"
        for number, qa in enumerate(case.vqa):
            link = hashlib.sha1(f"{self.seed}/{case.uid}/{number}".encode()).hexdigest()
            linked_id = f"{link[:8]}-{link[8:12]}-4{link[13:16]}-8{link[17:20]}-{link[20:32]}"
            base = {
                "qid_linked_id": linked_id, "image_case_url": f"https://phantom.invalid/case?id={case.uid}",
                "image_name": image_name, "image_organ": SPECS[case.modality].organ,
                "question_type": qa.question_type, "answer": qa.answer, "answer_type": qa.answer_type,
            }
            paraphrased = qa.paraphrase is not None
            self.entries.append({
                **base, "phrase_type": "test_freeform" if test else "freeform", "evaluation": "given",
                "question": qa.question, "question_rephrase": qa.paraphrase if paraphrased else "NULL",
                "question_relation": "strict agreement" if paraphrased else "NULL",
                "question_frame": qa.frame if paraphrased else "NULL",
            })
            if paraphrased:
                self.entries.append({
                    **base, "phrase_type": "test_para" if test else "para", "evaluation": "evaluated",
                    "question": qa.paraphrase, "question_rephrase": qa.question,
                    "question_relation": "strict agreement", "question_frame": qa.frame,
                })
        return {self.name: f"{self.name}/{self.image_folder}/{image_name}"}

    def finish(self) -> None:
        order = ["qid", "phrase_type", "qid_linked_id", "image_case_url", "image_name", "image_organ", "evaluation",
                 "question", "question_rephrase", "question_relation", "question_frame", "question_type", "answer",
                 "answer_type"]
        entries = [{key: ({**entry, "qid": qid})[key] for key in order} for qid, entry in enumerate(self.entries)]
        text = json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
        self.files.write(f"{self.name}/VQA_RAD Dataset Public.json", text)


# -- Med-GRIT (BiRD) ---------------------------------------------------------------------------------

class MedGrit:
    name = "med-grit"

    def __init__(self, files: Files) -> None:
        self.files = files
        self.parts: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}

    def add(self, case: PhantomCase, image: bytes) -> dict[str, str]:
        image_id = case.ids["medgrit_id"]
        self.files.write(f"{self.name}/images/{image_id}.png", image)
        part = "test" if case.split == "test" else "train"
        for conversation in case.conversations:
            self.parts[part].append({"id": image_id, "conversations": [list(turn) for turn in conversation.turns]})
        return {self.name: f"{self.name}/images/{image_id}.png"}

    def finish(self) -> None:
        for part, entries in self.parts.items():
            self.files.json(f"{self.name}/{part}.json", entries)


def native_entry(case: PhantomCase, files: Files, image: bytes, layout_paths: dict[str, str]) -> dict[str, Any]:
    """The phantom's own index line for one image (and its masks, report and image files)."""
    root = f"images/{case.modality}/{case.uid}.png"
    files.write(root, image)
    report = files.write(f"reports/{case.modality}/{case.uid}.txt", case.report)
    findings = []
    for number, finding in enumerate(case.findings):
        mask = files.write(f"masks/{case.modality}/{case.uid}_{number}.png", png_bytes(finding.mask.astype(np.uint8) * 255))
        findings.append({
            "label": finding.label, "box": list(finding.box), "mask": mask, "location": finding.location,
            "size_mm": finding.size_mm, "attributes": finding.attributes,
            "box_1000": grid_box(finding.box, case.image.shape[0]),
        })
    return {
        "uid": case.uid, "modality": case.modality, "view": case.view, "split": case.split, "index": case.index,
        "image": root, "image_size": [case.image.shape[1], case.image.shape[0]], "spacing_mm": round(case.spacing_mm, 4),
        "labels": case.labels, "clean_labels": case.clean_labels, "findings": findings, "report": report,
        "report_mentions": case.mentions, "table": case.table, "pathology": case.pathology,
        "patient_id": case.ids["patient_id"], "study_id": case.ids["study_id"], "ids": case.ids,
        "layouts": layout_paths,
        "conversations": [{"task": c.task, "turns": [list(t) for t in c.turns]} for c in case.conversations],
    }
