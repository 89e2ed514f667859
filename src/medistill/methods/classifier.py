"""The image-only classifier: the baseline every distillation method is compared with."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from medistill.config import ClassifierConfig, DataConfig
from medistill.data.datasets import ImageLabelDataset, normalise, preprocessing, split_for_validation
from medistill.data.formats import open_dataset
from medistill.data.records import Record
from medistill.engine.rundir import RunDir
from medistill.engine.trainer import Trainer, iterate_eval, seed_everything
from medistill.errors import UsageError
from medistill.losses.classification import masked_bce
from medistill.methods import register_runner
from medistill.metrics.classification import multilabel_metrics
from medistill.models import create_model
from medistill.models.vit import VisionTransformer

log = logging.getLogger(__name__)


def load_records(data: DataConfig) -> list[Record]:
    """The configured dataset's records, filtered to `data.modality` when set."""
    reader = open_dataset(data.format, data.root, **data.options)
    records = [r for r in reader.records() if data.modality is None or r.modality == data.modality]
    if not records:
        raise UsageError(f"no records in {data.root} (format {data.format}, modality {data.modality}): "
                         "check data.root, data.format and data.modality")
    return records


def label_names(records: list[Record], wanted: list[str]) -> list[str]:
    seen = list(dict.fromkeys(name for r in records for name in r.labels))
    if not wanted:
        return seen
    missing = [name for name in wanted if name not in seen]
    if missing:
        raise UsageError(f"labels {missing} do not occur in the data; available: {', '.join(seen)}")
    return list(wanted)



@torch.no_grad()
def predict(model: torch.nn.Module, dataset: ImageLabelDataset, batch_size: int) -> np.ndarray:
    """Sigmoid probabilities (samples, labels) in dataset order."""
    device = next(model.parameters()).device
    if len(dataset) == 0:
        return np.zeros((0, len(dataset.label_names)), dtype=np.float32)
    outputs = [torch.sigmoid(model(normalise(b["image"]).unsqueeze(1))["logits"].float()).cpu()
               for b in iterate_eval(dataset, batch_size, None, device)]
    return torch.cat(outputs).numpy()


class ClassifierTask:
    def __init__(self, model: VisionTransformer, datasets: dict[str, ImageLabelDataset], config: ClassifierConfig):
        self.model = model
        self.datasets = datasets
        self.config = config

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(normalise(batch["image"]).unsqueeze(1))["logits"]
        return {"bce": masked_bce(logits, batch["labels"])}

    def evaluate(self, split: str) -> dict[str, float]:
        dataset = self.datasets[split]
        probabilities = predict(self.model, dataset, self.config.train.eval_batch_size)
        return multilabel_metrics(probabilities, dataset.labels.numpy(), dataset.label_names)

    def checkpoint_module(self) -> torch.nn.Module:
        return self.model

    def checkpoint_config(self) -> dict[str, Any]:
        return {
            "kind": "classifier",
            "architecture": self.model.architecture(),
            "preprocessing": preprocessing(self.config.data.image_size),
            "labels": self.datasets["train"].label_names,
        }


def build_datasets(config: ClassifierConfig) -> dict[str, ImageLabelDataset]:
    records = load_records(config.data)
    names = label_names(records, config.data.labels)
    train, val = split_for_validation(records)
    test = [r for r in records if r.split == "test"]
    size = config.data.image_size
    datasets = {name: ImageLabelDataset(part, names, size) for name, part in
                (("train", train), ("val", val), ("test", test))}
    log.info("samples: train %d, val %d, test %d; labels: %s", len(train), len(val), len(test), ", ".join(names))
    return datasets


@register_runner("classifier")
def run_classifier(config: ClassifierConfig, run: RunDir, resume: bool) -> dict[str, Any]:
    datasets = build_datasets(config)
    names = datasets["train"].label_names
    seed_everything(config.train.seed)  # the initial weights follow the run's seed
    model = create_model(config.model.name, image_size=config.data.image_size, patch_size=config.model.patch_size,
                         num_classes=len(names), dropout=config.model.dropout, stem=config.model.stem,
                         stem_width=config.model.stem_width, stem_convs=config.model.stem_convs)
    task = ClassifierTask(model, datasets, config)
    trainer = Trainer(task, datasets["train"], config.train, config.optim, run)
    progress = trainer.fit(resume=resume)
    with torch.no_grad():
        test = task.evaluate("test") if len(datasets["test"]) else {}
    metrics = {
        "method": "classifier",
        "labels": names,
        "samples": {split: len(ds) for split, ds in datasets.items()},
        "prevalence": {split: ds.label_prevalence() for split, ds in datasets.items()},
        "val": next((h for h in progress.history if h["step"] == progress.best_step),
                    progress.history[-1] if progress.history else {}),
        "test": test,
        "steps": progress.step,
        "best_step": progress.best_step,
        "precision": str(trainer.dtype).replace("torch.", "") if trainer.dtype else "fp32",
    }
    run.write_metrics(metrics)
    return metrics
