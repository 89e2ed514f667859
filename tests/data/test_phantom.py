"""The phantom world: determinism, anatomy, exact masks, knobs that do what they say, text, layouts."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medistill.data.phantom import CXR_FINDINGS, MODALITIES, PhantomKnobs, generate_case, write_phantom
from medistill.data.phantom import writer as writer_module
from medistill.data.phantom.anatomy import RENDERERS
from medistill.data.phantom.case import lesion_free_image
from medistill.data.phantom.geometry import mask_box
from medistill.data.phantom.tables import sample_patient
from medistill.errors import UsageError

SMALL = PhantomKnobs(image_size=64)
VQA_FIELDS = {"qid", "phrase_type", "qid_linked_id", "image_case_url", "image_name", "image_organ", "evaluation",
              "question", "question_rephrase", "question_relation", "question_frame", "question_type", "answer",
              "answer_type"}
BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "world"
    write_phantom(root, cases=6, seed=3, knobs=SMALL)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_phantom(again, cases=6, seed=3, knobs=SMALL)
    first, second = _tree(world), _tree(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    other = tmp_path / "other"
    write_phantom(other, cases=6, seed=4, knobs=SMALL, modalities=["cxr"])
    assert (other / "cases.jsonl").read_bytes() != (world / "cases.jsonl").read_bytes()


def test_a_case_depends_only_on_seed_modality_and_index() -> None:
    late = generate_case(1, 5, "ct", SMALL)
    for index in range(5):  # generating others first changes nothing
        generate_case(1, index, "ct", SMALL)
    assert np.array_equal(generate_case(1, 5, "ct", SMALL).image, late.image)
    assert not np.array_equal(generate_case(1, 6, "ct", SMALL).image, late.image)


def _anatomy(modality: str, index: int, size: int = 128, **patient_overrides):
    rng = np.random.default_rng(index)
    patient = {**sample_patient(modality, rng), **patient_overrides}
    return RENDERERS[modality](rng, size, patient)


def _mean(anatomy, name: str) -> float:
    return float(anatomy.image[anatomy.structures[name] > 0.9].mean())


@pytest.mark.parametrize("index", range(3))
def test_anatomy_statistics(index: int) -> None:
    chest = _anatomy("cxr", index)
    assert _mean(chest, "right lung") < _mean(chest, "heart") - 0.1
    assert _mean(chest, "left lung") < _mean(chest, "heart") - 0.1
    breast = _anatomy("mammo", index, **{"image view": "MLO"})
    outside = breast.image[breast.structures["breast"] == 0].mean()
    assert outside + 0.1 < _mean(breast, "breast") < _mean(breast, "pectoral muscle")
    ct = _anatomy("ct", index)
    assert _mean(ct, "aorta") > _mean(ct, "liver") > float(ct.image[0:4, 0:4].mean()) + 0.3
    t1, t2 = _anatomy("mr", index, sequence="T1"), _anatomy("mr", index, sequence="T2")
    assert _mean(t1, "left lateral ventricle") < _mean(t1, "brain") - 0.1  # CSF dark on T1
    assert _mean(t2, "left lateral ventricle") > _mean(t2, "brain") + 0.1  # and bright on T2


@pytest.mark.parametrize("modality", MODALITIES)
def test_masks_are_exact(modality: str) -> None:
    knobs = PhantomKnobs(image_size=128, subtlety=0.0)
    checked = 0
    for index in range(8):
        case = generate_case(5, index, modality, knobs)
        if not case.findings:
            continue
        union = np.zeros(case.image.shape, dtype=bool)
        for finding in case.findings:
            assert finding.box == mask_box(finding.mask)
            assert finding.size_mm > 0 and finding.location["phrase"]
            union |= finding.mask
        changed = case.image != lesion_free_image(5, index, modality, knobs)
        assert not (changed & ~union).any(), "a lesion changed pixels outside its mask"
        assert changed.any()
        checked += 1
    assert checked >= 2


def test_subtlety_scales_lesion_contrast_to_noise() -> None:
    def cnr(subtlety: float) -> float:
        knobs = PhantomKnobs(image_size=128, subtlety=subtlety)
        ratios = []
        for index in range(12):
            case = generate_case(7, index, "ct", knobs)
            clean = lesion_free_image(7, index, "ct", knobs).astype(float)
            noise = float(np.std(np.diff(clean[48:80, 48:80], axis=1))) / np.sqrt(2)
            for finding in case.findings:
                contrast = abs(float((case.image[finding.mask] - clean[finding.mask]).mean()))
                ratios.append(contrast / noise)
        return float(np.mean(ratios))

    faint, plain = cnr(0.8), cnr(0.2)
    assert plain > 2.5 * faint  # contrast scales with 1 - subtlety: 0.8 / 0.2 = 4


def _chest_cnr_at_64px(subtlety: float) -> dict[str, float]:
    """Median over positive cases of mean |lesion change| / (clutter std + 2 grey levels) inside the mask at 64 px.

    Measured on the pixels a 64-px model sees (the 128-px image and its lesion-free twin, each resized
    as the loaders resize), so it catches lesions that vanish in the resize or drown in the lung clutter.
    """
    from medistill.data.imaging import resize

    knobs = PhantomKnobs(image_size=128, subtlety=subtlety)
    ratios: dict[str, list[float]] = {}
    for index in range(80):
        case = generate_case(11, index, "cxr", knobs)
        if not case.findings:
            continue
        free = resize(lesion_free_image(11, index, "cxr", knobs).astype(np.float32), 64)
        change = resize(case.image.astype(np.float32), 64) - free
        for finding in case.findings:
            inside = resize(finding.mask.astype(np.float32), 64) > 0.5
            if inside.any():
                ratios.setdefault(finding.label, []).append(
                    float(np.abs(change[inside]).mean() / (free[inside].std() + 2.0)))
    return {label: float(np.median(values)) for label, values in ratios.items()}


def test_chest_lesions_are_learnable_at_the_default_subtlety_and_fade_at_high_subtlety() -> None:
    # at the default the small findings stand out of the lung clutter at 64 px (a 4-layer CNN reaches
    # AUROC >= 0.8 on each); the old default (0.5, smaller and fainter nodules) gave nodule 4.0, mass 2.3,
    # consolidation 1.0, effusion 1.0, pneumothorax 0.22 here and AUROC near 0.5 for the small findings
    floors = {"nodule": 5.0, "mass": 2.5, "consolidation": 1.2, "pleural_effusion": 1.2, "pneumothorax": 0.35}
    default, faint = _chest_cnr_at_64px(PhantomKnobs().subtlety), _chest_cnr_at_64px(0.95)
    assert set(floors) <= set(default)
    for label, floor in floors.items():
        assert default[label] > floor, (label, default[label])
        assert faint[label] < 0.2 * default[label], (label, faint[label], default[label])
    middle = _chest_cnr_at_64px(0.6)
    assert all(faint[label] < middle[label] < default[label] for label in floors)


def _mentioned_share(completeness: float) -> float:
    knobs = PhantomKnobs(image_size=32, report_completeness=completeness)
    mentioned = total = 0
    for index in range(80):
        case = generate_case(2, index, "cxr", knobs)
        for label in {f.label for f in case.findings}:
            total += 1
            mentioned += case.mentions.get(label) in ("positive", "uncertain")
    return mentioned / total


def test_report_completeness_sets_the_share_of_findings_mentioned() -> None:
    assert _mentioned_share(1.0) == 1.0
    assert 0.15 < _mentioned_share(0.4) < 0.65


def test_label_noise_flips_the_expected_share_of_training_labels_only() -> None:
    knobs = PhantomKnobs(image_size=32, label_noise=0.2)
    flips = {"train": [], "test": [], "val": []}
    for index in range(150):
        case = generate_case(9, index, "cxr", knobs)
        flips[case.split] += [case.labels[k] != case.clean_labels[k] for k in CXR_FINDINGS]
    assert 0.15 < np.mean(flips["train"]) < 0.25
    assert not any(flips["test"]) and not any(flips["val"])


def test_reports_have_sections_negations_hedging_and_irrelevant_sentences() -> None:
    reports = [generate_case(4, i, "cxr", SMALL).report for i in range(30)]
    assert all("FINDINGS:" in r and "IMPRESSION:" in r for r in reports)
    text = "\n".join(reports)
    assert re.search(r"\bNo (pleural effusion|pneumothorax|focal consolidation)", text)
    assert re.search(r"Possible|cannot be excluded|There may be|Questionable|could represent", text)
    assert re.search(r"PICC|Sternotomy|Degenerative|osseous|EKG|clips|fracture|Hilar", text)


def test_mammography_pathology_follows_descriptors_and_assessment_nearly_gives_it_away() -> None:
    rows = []
    for index in range(300):
        for finding in generate_case(0, index, "mammo", PhantomKnobs(image_size=64)).findings:
            rows.append(finding.attributes)
    masses = [r for r in rows if "mass margins" in r]
    def malignant_rate(margin: str) -> float:
        chosen = [r["pathology"] == "MALIGNANT" for r in masses if r["mass margins"] == margin]
        return float(np.mean(chosen))
    assert malignant_rate("SPICULATED") > malignant_rate("CIRCUMSCRIBED") + 0.3
    malignant = [r["pathology"] == "MALIGNANT" for r in rows]
    assert roc_auc_score(malignant, [r["assessment"] for r in rows]) > 0.85
    assert {r["pathology"] for r in rows} == {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"}


def test_vqa_json_has_the_fourteen_fields_every_question_type_and_both_answer_types(world: Path) -> None:
    entries = json.loads((world / "vqa-rad" / "VQA_RAD Dataset Public.json").read_text())
    assert all(set(e) == VQA_FIELDS for e in entries)
    assert {e["question_type"] for e in entries} >= {"MODALITY", "PLANE", "ORGAN", "ABN", "PRES", "POS", "SIZE", "COUNT", "ATTRIB"}
    assert {e["answer_type"] for e in entries} == {"CLOSED", "OPEN"}
    assert {e["phrase_type"] for e in entries} <= {"freeform", "para", "test_freeform", "test_para"}
    assert len({e["qid"] for e in entries}) == len(entries)
    folder = world / "vqa-rad" / "VQA_RAD Image Folder"
    assert all((folder / e["image_name"]).is_file() for e in entries)


def test_grounding_conversations_parse(world: Path) -> None:
    prefixes = ("x_ray_", "mammo_", "ct_", "mr_")
    tasks = set()
    for part in ("train", "test"):
        for entry in json.loads((world / "med-grit" / f"{part}.json").read_text()):
            assert entry["id"].startswith(prefixes)
            assert (world / "med-grit" / "images" / f"{entry['id']}.png").is_file()
            for question, answer in entry["conversations"]:
                assert f"<img>{entry['id']}.png</img>" in question
                for match in BOX.finditer(question + answer):
                    x1, y1, x2, y2 = map(int, match.groups())
                    assert 0 <= x1 < x2 <= 999 and 0 <= y1 < y2 <= 999
                if "bounding box of <ref>" in question:
                    tasks.add("VG")
                    assert answer.startswith("<ref>") and BOX.search(answer)
    cases = [json.loads(line) for line in (world / "cases.jsonl").read_text().splitlines()]
    assert tasks == {"VG"} and {c["task"] for case in cases for c in case["conversations"]} == {"VG", "ROC", "RC", "MIA"}


def test_layouts_and_manifest(world: Path) -> None:
    manifest = json.loads((world / "manifest.json").read_text())
    assert list(manifest) == sorted(manifest) and manifest["seed"] == 3
    assert not re.search(r"time|date", json.dumps(manifest), re.I)
    mimic = world / "mimic-cxr"
    with (mimic / "mimic-cxr-2.0.0-chexpert.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"Lung Lesion", "Pleural Effusion", "No Finding"} <= set(rows[0])
    assert {value for row in rows for value in row.values()} >= {"1.0", "0.0", ""}
    for row in csv.DictReader((mimic / "ms-cxr-boxes.csv").open()):
        assert (mimic / row["path"]).is_file()
    with (world / "cbis-ddsm" / "calc_case_description_train_set.csv").open() as handle:
        assert "breast density" in next(csv.reader(handle))
    masses = list(csv.DictReader((world / "cbis-ddsm" / "mass_case_description_train_set.csv").open()))
    for row in masses:
        assert row["image file path"].startswith("Mass-Training_P_")
        assert (world / "cbis-ddsm" / row["ROI mask file path"]).is_file()
    cases = [json.loads(line) for line in (world / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 6 * len(MODALITIES)
    for case in cases:
        assert (world / case["image"]).is_file() and (world / case["report"]).is_file()
        assert all((world / f["mask"]).is_file() for f in case["findings"])


@pytest.mark.parametrize("kwargs, words", [
    ({"cases": 0}, "positive"),
    ({"cases": 2, "modalities": ["cxr", "pet"]}, "choose from: cxr, mammo, ct, mr"),
    ({"cases": 2, "knobs": PhantomKnobs(subtlety=2.0)}, "--subtlety"),
    ({"cases": 2, "knobs": PhantomKnobs(test_fraction=0.6, val_fraction=0.5)}, "no training cases"),
])
def test_bad_arguments_raise_usage_errors_and_leave_nothing(tmp_path: Path, kwargs: dict, words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        write_phantom(tmp_path / "out", seed=0, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_output_folder_rules(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        write_phantom(tmp_path / "missing" / "out", cases=1, seed=0, knobs=SMALL)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="overwrite=True"):
        write_phantom(busy, cases=1, seed=0, knobs=SMALL)
    write_phantom(busy, cases=1, seed=0, knobs=SMALL, modalities=["mr"], overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "cases.jsonl").is_file()
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="write permission"):
            write_phantom(locked / "out", cases=1, seed=0, knobs=SMALL)


def test_a_failure_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = writer_module.generate_case

    def failing(seed: int, index: int, modality: str, knobs: PhantomKnobs):
        if index == 2:
            raise RuntimeError("disk on fire")
        return real(seed, index, modality, knobs)

    monkeypatch.setattr(writer_module, "generate_case", failing)
    with pytest.raises(RuntimeError):
        write_phantom(tmp_path / "out", cases=4, seed=0, knobs=SMALL)
    assert list(tmp_path.iterdir()) == []
