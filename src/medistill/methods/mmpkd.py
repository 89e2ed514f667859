"""MMPKD: a privileged-modality teacher (report text or clinical table) distilled into an image-only ViT.

For each seed (and fold, with k-fold cross-validation) the experiment trains the teacher, the student
without distillation and the student with distillation, then measures classification and the zero-shot
localization of both students' attention maps against the ground-truth regions, each beside its chance
level. See docs/methods.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medistill.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, register_recipe
from medistill.data.augment import AugmentConfig, augment_images
from medistill.data.datasets import (ImageLabelDataset, normalise, patient_hash, patient_holdout, preprocessing,
                                     split_for_validation)
from medistill.data.records import Record
from medistill.data.privacy import case_id
from medistill.engine.distributed import main_only
from medistill.engine.logging import write_json
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.engine.trainer import Trainer, resolve_device
from medistill.errors import UsageError
from medistill.explain.localize import MAP_KINDS, attention_maps, evaluate_localization, localization_targets
from medistill.explain.overlay import heatmap, outline, png_bytes, to_rgb
from medistill.losses.classification import masked_bce
from medistill.losses.kd import bernoulli_kd, feature_kd
from medistill.methods import register_runner
from medistill.methods.classifier import label_names, load_records, predict
from medistill.methods.teachers import TeacherConfig, TrainedTeacher, train_teacher
from medistill.metrics.classification import multilabel_metrics
from medistill.metrics.summary import summarise_runs
from medistill.models import create_model
from medistill.models.pretrained import load_pretrained_vit
from medistill.models.vit import VisionTransformer

log = logging.getLogger(__name__)

MODELS = ("teacher", "student", "student_kd")


@dataclass
class StudentConfig(ModelConfig):
    """The image-only ViT; `pretrained` is a local Hugging Face ViT or CLIP-vision directory.

    `augment` and `focal_gamma` (the task loss is focal BCE when > 0) apply to both students alike.
    """

    pretrained: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    focal_gamma: float = 0.0


@dataclass
class DistillConfig:
    """`(1 - alpha) * task + alpha * T^2 * KL(teacher_T || student_T)` (+ feature_weight * feature term)."""

    alpha: float = 0.5
    temperature: float = 2.0
    feature_weight: float = 0.0  # > 0 adds feature KD through a projection of the student's CLS embedding
    feature_kind: str = "cosine"  # cosine | mse
    mode: str = "offline"  # offline: teacher outputs cached once; online: the teacher runs on every batch


@dataclass
class ExplainConfig:
    maps: list[str] = field(default_factory=lambda: ["cls", "rollout"])
    top_fraction: float = 0.1  # IoU / Dice use the top 10% of attention pixels
    gallery: int = 8


@dataclass
class MMPKDConfig:
    method: str = "mmpkd"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    folds: int = 0  # > 1: patient-level k-fold cross-validation instead of the dataset's own test split


register_recipe("mmpkd", MMPKDConfig)


def validate(config: MMPKDConfig) -> None:
    d = config.distill
    if not 0.0 <= d.alpha <= 1.0:
        raise UsageError(f"distill.alpha must lie in [0, 1], not {d.alpha}")
    if d.temperature <= 0:
        raise UsageError(f"distill.temperature must be positive, not {d.temperature}")
    if d.mode not in ("offline", "online"):
        raise UsageError(f"distill.mode must be offline or online, not {d.mode!r}")
    non_neural = config.teacher.kind == "tabular" and config.teacher.model == "hgb"
    if non_neural and d.mode == "online":
        raise UsageError("distill.mode=online needs a neural teacher (teacher.model=hgb has none): use offline")
    if non_neural and d.feature_weight > 0:
        raise UsageError("distill.feature_weight > 0 needs a teacher with embeddings (teacher.model=hgb has none)")
    unknown = [kind for kind in config.explain.maps if kind not in MAP_KINDS]
    if unknown:
        raise UsageError(f"explain.maps {unknown} unknown; choose from {', '.join(MAP_KINDS)}")
    if not config.seeds:
        raise UsageError("seeds is empty: give at least one seed")
    if config.student.pretrained and config.student.stem != "patch":
        raise UsageError("student.pretrained checkpoints have a patch stem: drop student.stem=conv")
    if config.student.focal_gamma < 0:
        raise UsageError(f"student.focal_gamma must be >= 0, not {config.student.focal_gamma}")
    if config.folds == 1 or config.folds < 0:
        raise UsageError("folds must be 0 (use the dataset's split) or at least 2")


# ----------------------------------------------------------------------------------------------
# splits


def _fold_of(record: Record, folds: int) -> int:
    return patient_hash(record) % folds


def make_splits(records: list[Record], folds: int) -> list[dict[str, list[int]]]:
    """Index lists per split: the dataset's own split, or one entry per patient-level fold."""
    position = {id(r): i for i, r in enumerate(records)}

    def indices(part: list[Record]) -> list[int]:
        return [position[id(r)] for r in part]

    if folds == 0:
        train, val = split_for_validation(records)
        return [{"train": indices(train), "val": indices(val),
                 "test": [i for i, r in enumerate(records) if r.split == "test"]}]
    units = []
    for fold in range(folds):
        train, val = patient_holdout([r for r in records if _fold_of(r, folds) != fold])
        units.append({"train": indices(train), "val": indices(val),
                      "test": [i for i, r in enumerate(records) if _fold_of(r, folds) == fold]})
    return units


# ----------------------------------------------------------------------------------------------
# the student


class WithTargets(Dataset):
    """Image samples with per-sample extra tensors (cached teacher outputs, or teacher inputs when online)."""

    def __init__(self, images: ImageLabelDataset, extra: dict[str, torch.Tensor]) -> None:
        self.images = images
        self.extra = extra

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.images[index], **{k: v[index] for k, v in self.extra.items()}}


class StudentTask:
    """The ViT student; with alpha = 0 and no feature term it is the plain image-only baseline."""

    def __init__(self, vit: VisionTransformer, datasets: dict[str, ImageLabelDataset], distill: DistillConfig,
                 config: MMPKDConfig, teacher: TrainedTeacher | None) -> None:
        self.vit = vit
        self.datasets = datasets
        self.distill = distill
        self.config = config
        self.teacher = teacher
        modules: dict[str, nn.Module] = {"vit": vit}
        if distill.feature_weight > 0:
            if teacher is None or "embedding" not in teacher.outputs["train"]:
                raise UsageError("distill.feature_weight > 0 needs a teacher with embeddings (not teacher.model=hgb)")
            modules["projection"] = nn.Linear(vit.spec.width, teacher.outputs["train"]["embedding"].shape[1])
        self.model = nn.ModuleDict(modules)

    def uses_teacher(self) -> bool:
        return self.distill.alpha > 0 or self.distill.feature_weight > 0

    def train_dataset(self, device: torch.device) -> Dataset:
        images = self.datasets["train"]
        if not self.uses_teacher() or self.teacher is None:
            return images
        if self.distill.mode == "online":
            if self.teacher.online is None:
                raise UsageError("distill.mode=online needs a neural teacher (teacher.model=hgb has none)")
            self.teacher.online.to(device).eval()
            return WithTargets(images, {f"teacher_in/{k}": v for k, v in self.teacher.inputs["train"].items()})
        outputs = self.teacher.outputs["train"]
        return WithTargets(images, {f"teacher/{k}": v for k, v in outputs.items()})

    def _teacher_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.distill.mode == "online":
            assert self.teacher is not None and self.teacher.online is not None
            inputs = {k.split("/", 1)[1]: v for k, v in batch.items() if k.startswith("teacher_in/")}
            with torch.no_grad():
                return self.teacher.online(**inputs)
        return {k.split("/", 1)[1]: v for k, v in batch.items() if k.startswith("teacher/")}

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        s = self.config.student
        images = normalise(batch["image"]).unsqueeze(1)
        out = self.vit(augment_images(images, s.augment) if self.vit.training else images)
        d = self.distill
        terms = {"task": (1 - d.alpha) * masked_bce(out["logits"], batch["labels"], s.focal_gamma)}
        if not self.uses_teacher():
            return terms
        teacher = self._teacher_outputs(batch)
        if d.alpha > 0:
            terms["kd"] = d.alpha * bernoulli_kd(out["logits"], teacher["logits"], d.temperature)
        if d.feature_weight > 0:
            projected = self.model["projection"](out["embedding"])
            terms["feature"] = d.feature_weight * feature_kd(projected, teacher["embedding"], d.feature_kind)
        return terms

    def evaluate(self, split: str) -> dict[str, float]:
        dataset = self.datasets[split]
        probabilities = predict(self.vit, dataset, self.config.train.eval_batch_size)
        return multilabel_metrics(probabilities, dataset.labels.numpy(), dataset.label_names)

    def checkpoint_module(self) -> nn.Module:
        return self.vit

    def checkpoint_config(self) -> dict[str, Any]:
        return {"kind": "classifier", "architecture": self.vit.architecture(),
                "preprocessing": preprocessing(self.config.data.image_size),
                "labels": self.datasets["train"].label_names, "method": "mmpkd"}


def build_student(config: MMPKDConfig, num_classes: int, seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    s = config.student
    if s.pretrained:
        return load_pretrained_vit(s.pretrained, num_classes=num_classes, image_size=config.data.image_size,
                                   dropout=s.dropout)
    return create_model(s.name, image_size=config.data.image_size, patch_size=s.patch_size,
                        num_classes=num_classes, dropout=s.dropout, stem=s.stem, stem_width=s.stem_width,
                        stem_convs=s.stem_convs)  # type: ignore[return-value]


def train_student(config: MMPKDConfig, datasets: dict[str, ImageLabelDataset], distill: DistillConfig,
                  teacher: TrainedTeacher | None, seed: int, run_dir: Path) -> tuple[VisionTransformer, dict[str, float]]:
    """Train one student in `run_dir` (resumable) and return it with its test metrics."""
    vit = build_student(config, len(datasets["train"].label_names), seed)
    task = StudentTask(vit, datasets, distill, config, teacher)
    train = TrainConfig(**{**vars(config.train), "seed": seed})
    run = RunDir(prepare_output_dir(run_dir, resume=True))
    trainer = Trainer(task, task.train_dataset(resolve_device(train.device)), train, config.optim, run)
    trainer.fit(resume=run.train_state.exists())
    metrics = task.evaluate("test")
    metrics.update(evaluate_localization(vit, datasets["test"], config.explain.maps, config.explain.top_fraction))
    return vit, metrics


# ----------------------------------------------------------------------------------------------
# the experiment


def gallery(students: dict[str, VisionTransformer], dataset: ImageLabelDataset, count: int) -> list[tuple[bytes, str]]:
    """For test images with regions: the outlined region, then each student's rollout map on the same image."""
    indices, masks = localization_targets(dataset)
    chosen = indices[:count]
    maps = {name: attention_maps(model, dataset.images[chosen], ["rollout"])["rollout"]
            for name, model in students.items()}
    items = []
    scale = max(1, 220 // dataset.image_size)
    for row, index in enumerate(chosen):
        grey = dataset.images[index].numpy().astype(np.float32) / 255.0
        record = dataset.records[index]
        labels = ", ".join(k for k, v in record.labels.items() if v == 1.0) or "no positive label"
        items.append((png_bytes(outline(to_rgb(grey), masks[row], (255, 64, 64)), scale), f"{case_id(record.uid)}: {labels}"))
        for name in students:
            items.append((png_bytes(heatmap(grey, maps[name][row]), scale), f"{name} attention rollout"))
    return items


def run_unit(config: MMPKDConfig, images: ImageLabelDataset, split: dict[str, list[int]], seed: int,
             run_dir: Path, cache_dir: Path) -> tuple[dict[str, dict[str, float]], dict[str, VisionTransformer]]:
    """Teacher, student and distilled student for one seed and one split; their test metrics."""
    datasets = {name: images.subset(indices) for name, indices in split.items()}
    records = {name: d.records for name, d in datasets.items()}
    names = images.label_names
    log.info("seed %d: teacher (%s) on %d training samples", seed, config.teacher.kind, len(split["train"]))
    teacher = train_teacher(config.teacher, records, names, TrainConfig(**{**vars(config.train), "seed": seed}),
                            run_dir / "teacher", cache_dir)
    log.info("seed %d: student without distillation", seed)
    plain = DistillConfig(alpha=0.0, temperature=config.distill.temperature, feature_weight=0.0)
    student, student_metrics = train_student(config, datasets, plain, None, seed, run_dir / "student")
    log.info("seed %d: student with distillation (alpha %.2f, T %.1f, %s)", seed, config.distill.alpha,
             config.distill.temperature, config.distill.mode)
    distilled, kd_metrics = train_student(config, datasets, config.distill, teacher, seed, run_dir / "student_kd")
    metrics = {"teacher": teacher.metrics["test"], "student": student_metrics, "student_kd": kd_metrics}
    return metrics, {"student": student, "student_kd": distilled}


@register_runner("mmpkd")
def run_mmpkd(config: MMPKDConfig, run: RunDir, resume: bool) -> dict[str, Any]:
    validate(config)
    started = time.perf_counter()
    records = load_records(config.data)
    names = label_names(records, config.data.labels)
    records = [r for r in records if any(r.labels.get(n) in (0.0, 1.0) for n in names)]
    images = ImageLabelDataset(records, names, config.data.image_size)
    units = make_splits(records, config.folds)
    results: list[dict[str, Any]] = []
    last_students: dict[str, VisionTransformer] = {}
    last_test: ImageLabelDataset | None = None
    for seed in config.seeds:
        for fold, split in enumerate(units):
            unit_dir = run.path / f"seed{seed}" / (f"fold{fold}" if config.folds else "")
            metrics, last_students = run_unit(config, images, split, seed, unit_dir, run.path / "cache")
            results.append({"seed": seed, "fold": fold if config.folds else None, **metrics})
            run.log.write("unit", seed=seed, fold=fold, **{f"{m}/{k}": v for m in MODELS for k, v in metrics[m].items()})
            last_test = images.subset(split["test"])
    summary: dict[str, Any] = {model: summarise_runs([{k: v for k, v in r[model].items() if not k.startswith("chance/")}
                                                      for r in results]) for model in MODELS}
    chance = summarise_runs([{k: v for k, v in r["student"].items() if k.startswith("chance/")} for r in results])
    metrics = {
        "method": "mmpkd", "labels": names, "teacher_kind": config.teacher.kind, **summary,
        "chance": {k.split("/", 1)[1]: v["mean"] for k, v in chance.items()},
        "units": results, "samples": {k: len(v) for k, v in units[0].items()},
        "seconds": time.perf_counter() - started,
    }
    run.write_metrics(metrics)
    if last_test is not None:
        _save_gallery(run.path / "gallery", gallery(last_students, last_test, config.explain.gallery))
    from medistill.report.mmpkd import write_mmpkd_report

    write_mmpkd_report(run.path)
    return metrics


@main_only
def _save_gallery(directory: Path, items: list[tuple[bytes, str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, (png, _) in enumerate(items):
        (directory / f"{index:03d}.png").write_bytes(png)
    write_json(directory / "captions.json", [caption for _, caption in items])
