from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medistill.config import load_config
from medistill.data.records import Record
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.errors import UsageError
from medistill.methods.mmpkd import DistillConfig, MMPKDConfig, make_splits, run_mmpkd

REPO = Path(__file__).resolve().parents[2]


def tiny(root: Path, *overrides: str) -> MMPKDConfig:
    return load_config(REPO / "configs" / "mmpkd" / "phantom-cxr-report.yaml", [
        f"data.root={root}", "data.image_size=32", "student.name=vit-nano", "student.patch_size=8",
        "train.epochs=1", "train.batch_size=8", "teacher.epochs=2", "explain.gallery=2", "seeds=[0, 1]",
        *overrides])


@pytest.mark.slow
def test_text_teacher_experiment_writes_all_three_models(tiny_phantom, tmp_path):
    config = tiny(tiny_phantom)
    run = RunDir(prepare_output_dir(tmp_path / "run"))
    metrics = run_mmpkd(config, run, False)
    for model in ("teacher", "student", "student_kd"):
        assert 0.0 <= metrics[model]["accuracy"]["mean"] <= 1.0
        assert len(metrics[model]["accuracy"]["values"]) == 2
        assert metrics[model]["accuracy"]["ci95"] is not None
    assert "rollout/pointing_game" in metrics["student"] and "cls/mass_inside" in metrics["student_kd"]
    assert 0 < metrics["chance"]["mass_inside"] < 1 and metrics["chance"]["pixel_auroc"] == 0.5
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved["units"][0]) >= {"seed", "teacher", "student", "student_kd"}
    captions = json.loads((tmp_path / "run" / "gallery" / "captions.json").read_text())
    assert len(captions) == 6 and "student_kd attention rollout" in captions
    page = (tmp_path / "run" / "report.html").read_text()
    assert "student + KD" in page and "chance" in page
    assert (tmp_path / "run" / "seed1" / "student_kd" / "checkpoints" / "model.safetensors").is_file()


@pytest.mark.slow
def test_tabular_teacher_online_with_feature_kd(tiny_phantom, tmp_path):
    config = tiny(tiny_phantom, "data.modality=mammo", "teacher.kind=tabular", "distill.mode=online",
                  "distill.feature_weight=0.5", "seeds=[0]")
    metrics = run_mmpkd(config, RunDir(prepare_output_dir(tmp_path / "run")), False)
    assert metrics["labels"] == ["malignant"]
    events = [json.loads(line) for line in (tmp_path / "run" / "seed0" / "student_kd" / "log.jsonl").open()]
    terms = {key for event in events if event["event"] == "train" for key in event}
    assert {"loss/task", "loss/kd", "loss/feature"} <= terms


def test_online_distillation_needs_a_neural_teacher(tiny_phantom, tmp_path):
    config = tiny(tiny_phantom, "data.modality=mammo", "teacher.kind=tabular", "teacher.model=hgb",
                  "distill.mode=online", "seeds=[0]")
    with pytest.raises(UsageError, match="online needs a neural teacher"):
        run_mmpkd(config, RunDir(prepare_output_dir(tmp_path / "run")), False)


@pytest.mark.parametrize("override, message", [
    ("distill.alpha=1.5", "alpha"), ("distill.mode=sometimes", "offline or online"), ("explain.maps=[gradcam]", "gradcam"),
    ("folds=1", "folds"), ("seeds=[]", "seeds"), ("student.focal_gamma=-1", "focal_gamma"),
    ("student.augment.shift=0.6", "augment.shift"),
])
def test_bad_settings_are_refused(tiny_phantom, tmp_path, override, message):
    with pytest.raises(UsageError, match=message):
        run_mmpkd(tiny(tiny_phantom, override), RunDir(prepare_output_dir(tmp_path / "run")), False)


def test_folds_partition_patients():
    records = [Record(uid=str(i), image=None, patient_id=f"p{i // 2}", split="train") for i in range(40)]
    units = make_splits(records, 4)
    tested = sorted(i for unit in units for i in unit["test"])
    assert tested == list(range(40))
    for unit in units:
        assert not set(unit["test"]) & (set(unit["train"]) | set(unit["val"]))
        test_patients = {records[i].patient_id for i in unit["test"]}
        assert not test_patients & {records[i].patient_id for i in unit["train"] + unit["val"]}


def test_plain_student_has_only_the_task_term(tiny_phantom):
    from medistill.data.datasets import ImageLabelDataset
    from medistill.methods.mmpkd import StudentTask, build_student

    config = tiny(tiny_phantom)
    from medistill.methods.classifier import load_records

    records = load_records(config.data)[:8]
    dataset = ImageLabelDataset(records, ["nodule", "mass"], 32)
    task = StudentTask(build_student(config, 2, 0), {"train": dataset}, DistillConfig(alpha=0.0), config, None)
    terms = task.loss_terms({"image": dataset.images, "labels": dataset.labels})
    assert set(terms) == {"task"} and torch.isfinite(terms["task"])


def test_student_augments_and_uses_focal_loss_only_in_training(tiny_phantom):
    from medistill.data.datasets import ImageLabelDataset
    from medistill.losses.classification import masked_bce
    from medistill.methods.classifier import load_records
    from medistill.methods.mmpkd import StudentTask, build_student

    config = tiny(tiny_phantom, "student.augment.shift=0.1", "student.augment.hflip=true", "student.focal_gamma=2.0")
    dataset = ImageLabelDataset(load_records(config.data)[:8], ["nodule", "mass"], 32)
    task = StudentTask(build_student(config, 2, 0), {"train": dataset}, DistillConfig(alpha=0.0), config, None)
    batch = {"image": dataset.images, "labels": dataset.labels}
    task.vit.eval()
    torch.manual_seed(0)
    first = task.loss_terms(batch)["task"]
    assert torch.equal(first, task.loss_terms(batch)["task"])  # no augmentation outside training
    logits = task.vit(normalise_batch(dataset.images))["logits"]
    assert first.item() == pytest.approx(masked_bce(logits, dataset.labels, 2.0).item(), rel=1e-5)
    assert first.item() < masked_bce(logits, dataset.labels).item()
    task.vit.train()
    assert not torch.equal(task.loss_terms(batch)["task"], task.loss_terms(batch)["task"])


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    from medistill.data.datasets import normalise

    return normalise(images).unsqueeze(1)
