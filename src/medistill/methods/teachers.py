"""Privileged-modality teachers for MMPKD: report text or a clinical table in, label logits out.

- text, frozen encoder (default): sentence embeddings are computed once and cached; only an MLP head trains.
- text, fine-tuned: the encoder and head train together on tokenised reports.
- tabular MLP: categorical embeddings + standardised numbers + missing indicators (models/tabular.py).
- tabular HGB: scikit-learn's HistGradientBoostingClassifier per label (no embedding: no feature KD).

Every teacher yields, per split, `logits` (N, labels) and, for the neural ones, `embedding` (N, width).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from medistill.engine import distributed
from medistill.config import OptimConfig, TrainConfig
from medistill.data.datasets import label_matrix
from medistill.data.formats.mimic_cxr import report_sections
from medistill.data.records import Record
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.engine.trainer import Trainer, iterate_eval
from medistill.errors import UsageError
from medistill.losses.classification import masked_bce
from medistill.metrics.classification import multilabel_metrics
from medistill.models.tabular import TableSchema, TabularMLP, warn_on_leaky_columns
from medistill.models.text import DEFAULT_TEXT_ENCODER, TextEncoder

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """What the teacher sees and how it learns."""

    kind: str = "text"  # text | tabular
    encoder: str = DEFAULT_TEXT_ENCODER  # text: 'minilm-l6' or a local Hugging Face BERT-family directory
    finetune: bool = False  # text: train the encoder too (slow on a CPU)
    sections: list[str] = field(default_factory=lambda: ["FINDINGS", "IMPRESSION"])  # empty: the whole report
    max_length: int = 256
    model: str = "mlp"  # tabular: mlp | hgb
    columns: list[str] = field(default_factory=list)  # tabular: columns the teacher sees (empty: all but `exclude`)
    exclude: list[str] = field(default_factory=lambda: list(IDENTIFIER_AND_TARGET_COLUMNS))
    leak_threshold: float = 0.9  # warn when one table column alone separates a label with this AUROC
    hidden: int = 128
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    finetune_lr: float = 3e-5


# Never teacher inputs by default: identifiers (which also must not leak) and the CBIS-DDSM target itself.
IDENTIFIER_AND_TARGET_COLUMNS = ("patient_id", "subject_id", "study_id", "dicom_id", "abnormality id", "pathology")


class TensorDictDataset(Dataset):
    """Samples as slices of equally long tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors differ in length: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


class HeadTeacher(nn.Module):
    """An MLP over fixed features (cached sentence embeddings)."""

    def __init__(self, width: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(0.1))
        self.head = nn.Linear(hidden, outputs)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.body(features)
        return {"logits": self.head(embedding), "embedding": embedding}


class TextTeacher(nn.Module):
    """Text encoder followed by a HeadTeacher: the whole teacher for fine-tuning and for online distillation."""

    def __init__(self, encoder: TextEncoder, head: HeadTeacher) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.encoder(input_ids, attention_mask)["embedding"])



class TeacherTask:
    """Trains a teacher module whose inputs are named tensors of a TensorDictDataset."""

    def __init__(self, model: nn.Module, inputs: Sequence[str], splits: dict[str, TensorDictDataset],
                 names: Sequence[str], batch_size: int) -> None:
        self.model = model
        self.inputs = list(inputs)
        self.splits = splits
        self.names = list(names)
        self.batch_size = batch_size

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(**{k: batch[k] for k in self.inputs})["logits"]
        return {"bce": masked_bce(logits, batch["labels"])}

    @torch.no_grad()
    def outputs(self, split: str) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        parts = [self.model(**{k: b[k] for k in self.inputs})
                 for b in iterate_eval(self.splits[split], self.batch_size, None, device)]
        if not parts:  # an empty split (tiny data sets)
            return {"logits": torch.zeros(0, len(self.names)), "embedding": torch.zeros(0, 0)}
        return {key: torch.cat([p[key].float().cpu() for p in parts]) for key in ("logits", "embedding")}

    def evaluate(self, split: str) -> dict[str, float]:
        logits = self.outputs(split)["logits"]
        labels = self.splits[split].tensors["labels"].numpy()
        return multilabel_metrics(torch.sigmoid(logits).numpy(), labels, self.names)

    def checkpoint_module(self) -> nn.Module:
        return self.model

    def checkpoint_config(self) -> dict[str, Any]:
        return {"kind": "teacher", "labels": self.names, "inputs": self.inputs}


@dataclass
class TrainedTeacher:
    """A trained teacher's outputs on every split, its metrics, and (neural) the module for online use."""

    outputs: dict[str, dict[str, torch.Tensor]]
    metrics: dict[str, dict[str, float]]
    online: nn.Module | None  # takes the batch's teacher inputs (see `online_inputs`)
    online_inputs: list[str]
    inputs: dict[str, dict[str, torch.Tensor]]  # per split, the tensors the online module takes


def report_texts(records: Sequence[Record], sections: Sequence[str]) -> list[str]:
    """The report text a teacher reads: the named sections joined (the whole report when none are found)."""
    texts = []
    for record in records:
        if not record.report or not record.report.strip():
            raise UsageError(f"record {record.uid} has an empty report: a text teacher needs one for every "
                             "training sample (filter such records or use a tabular teacher)")
        found = report_sections(record.report)
        chosen = [f"{name}: {found[name]}" for name in sections if found.get(name)]
        texts.append(" ".join(chosen) if chosen else " ".join(record.report.split()))
    return texts


def table_rows(records: Sequence[Record], columns: Sequence[str], exclude: Sequence[str]) -> list[dict[str, Any]]:
    """The table cells a teacher sees: the chosen columns, or every column but the excluded ones."""
    rows = []
    for record in records:
        row = dict(record.table or {})
        rows.append({c: row.get(c) for c in columns} if columns else {k: v for k, v in row.items() if k not in exclude})
    return rows


def _cached_embeddings(encoder: TextEncoder, texts: list[str], cache_dir: Path) -> torch.Tensor:
    """Sentence embeddings of `texts`, computed once per (encoder, texts) and kept in `cache_dir`."""
    digest = hashlib.sha256("\x00".join([encoder.source, str(encoder.max_length), *texts]).encode()).hexdigest()[:16]
    path = cache_dir / f"text-embeddings-{digest}.safetensors"
    if path.is_file():
        return load_file(str(path))["embedding"]
    log.info("encoding %d reports with %s (cached in %s)", len(texts), encoder.source, path)
    embedding = encoder.encode(texts)
    if distributed.is_main():  # every rank computed the same; one writes
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"embedding": embedding.contiguous()}, str(tmp))
        tmp.replace(path)
    return embedding


def _fit(model: nn.Module, inputs: list[str], tensors: dict[str, dict[str, torch.Tensor]], names: Sequence[str],
         config: TeacherConfig, lr: float, train: TrainConfig, run_dir: Path) -> TeacherTask:
    splits = {split: TensorDictDataset(t) for split, t in tensors.items()}
    task = TeacherTask(model, inputs, splits, names, config.batch_size)
    train_config = TrainConfig(seed=train.seed, epochs=config.epochs, batch_size=config.batch_size,
                               eval_batch_size=config.batch_size * 4, precision=train.precision, device=train.device,
                               progress=train.progress, early_stopping=train.early_stopping)
    optim = OptimConfig(lr=lr, warmup_steps=10, weight_decay=0.01)
    trainer = Trainer(task, splits["train"], train_config, optim, RunDir(prepare_output_dir(run_dir, resume=True)))
    trainer.fit(resume=trainer.run.train_state.exists())
    return task


def train_teacher(config: TeacherConfig, splits: dict[str, list[Record]], names: Sequence[str], train: TrainConfig,
                  run_dir: Path, cache_dir: Path) -> TrainedTeacher:
    """Train the configured teacher on `splits['train']` (selected on 'val') and compute its outputs."""
    torch.manual_seed(train.seed)
    labels = {split: label_matrix(records, names) for split, records in splits.items()}
    if config.kind == "text":
        return _train_text_teacher(config, splits, labels, names, train, run_dir, cache_dir)
    if config.kind == "tabular":
        rows = {split: table_rows(records, config.columns, config.exclude) for split, records in splits.items()}
        if not any(rows["train"]):
            raise UsageError("the training records carry no table: a tabular teacher needs a table row per sample")
        for column in range(len(names)):
            warn_on_leaky_columns(rows["train"], labels["train"][:, column].tolist(), config.leak_threshold)
        if config.model == "hgb":
            return _train_hgb_teacher(rows, labels, names, train.seed)
        if config.model != "mlp":
            raise UsageError(f"teacher.model must be mlp or hgb, not {config.model!r}")
        schema = TableSchema.fit(rows["train"], config.columns or None)
        tensors = {split: {**schema.encode(r), "labels": labels[split]} for split, r in rows.items()}
        inputs = ["categories", "numbers", "missing"]
        model = TabularMLP(schema, len(names), hidden=config.hidden)
        task = _fit(model, inputs, tensors, names, config, config.lr, train, run_dir)
        return _collect(task, tensors, inputs, model)
    raise UsageError(f"teacher.kind must be text or tabular, not {config.kind!r}")


def _train_text_teacher(config: TeacherConfig, splits: dict[str, list[Record]], labels: dict[str, torch.Tensor],
                        names: Sequence[str], train: TrainConfig, run_dir: Path, cache_dir: Path) -> TrainedTeacher:
    encoder = TextEncoder(config.encoder, max_length=config.max_length)
    texts = {split: report_texts(records, config.sections) for split, records in splits.items()}
    head = HeadTeacher(encoder.width, config.hidden, len(names))
    tokens = {split: dict(encoder.tokenize(t) if t else {}) for split, t in texts.items()}
    token_inputs = {split: {"input_ids": _pad(t["input_ids"], config.max_length),
                            "attention_mask": _pad(t["attention_mask"], config.max_length)}
                    for split, t in tokens.items() if t}
    whole = TextTeacher(encoder, head)
    if config.finetune:
        tensors = {split: {**token_inputs[split], "labels": labels[split]} for split in token_inputs}
        task = _fit(whole, ["input_ids", "attention_mask"], tensors, names, config, config.finetune_lr, train, run_dir)
        outputs = {split: task.outputs(split) for split in tensors}
    else:
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)
        tensors = {split: {"features": _cached_embeddings(encoder, t, cache_dir), "labels": labels[split]}
                   for split, t in texts.items() if t}
        task = _fit(head, ["features"], tensors, names, config, config.lr, train, run_dir)
        outputs = {split: task.outputs(split) for split in tensors}
    whole.eval()
    metrics = {split: task.evaluate(split) for split in tensors if split != "train"}
    return TrainedTeacher(outputs, metrics, whole, ["input_ids", "attention_mask"], token_inputs)


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad token tensors to a fixed length so samples of different batches stack."""
    return nn.functional.pad(tensor, (0, length - tensor.shape[1]))


def _collect(task: TeacherTask, tensors: dict[str, dict[str, torch.Tensor]], inputs: list[str],
             model: nn.Module) -> TrainedTeacher:
    outputs = {split: task.outputs(split) for split in tensors}
    metrics = {split: task.evaluate(split) for split in tensors if split != "train"}
    online_inputs = {split: {k: t[k] for k in inputs} for split, t in tensors.items()}
    return TrainedTeacher(outputs, metrics, model, inputs, online_inputs)


def _train_hgb_teacher(rows: dict[str, list[dict[str, Any]]], labels: dict[str, torch.Tensor], names: Sequence[str],
                       seed: int) -> TrainedTeacher:
    from sklearn.ensemble import HistGradientBoostingClassifier

    schema = TableSchema.fit(rows["train"])
    features = {split: _hgb_features(schema, r) for split, r in rows.items()}
    categorical = [True] * len(schema.categorical) + [False] * (len(schema.numeric) + len(schema.columns))
    logits = {split: torch.zeros(len(r), len(names)) for split, r in rows.items()}
    for column, name in enumerate(names):
        y = labels["train"][:, column].numpy()
        known = ~np.isnan(y)
        if len(np.unique(y[known])) < 2:
            raise UsageError(f"label {name!r} has one class only in the training split: a teacher cannot learn it")
        model = HistGradientBoostingClassifier(categorical_features=categorical, random_state=seed, max_iter=200)
        model.fit(features["train"][known], y[known].astype(int))
        for split, x in features.items():
            if not len(x):
                continue
            probability = np.clip(model.predict_proba(x)[:, 1], 1e-6, 1 - 1e-6)
            logits[split][:, column] = torch.from_numpy(np.log(probability / (1 - probability))).float()
    outputs = {split: {"logits": value} for split, value in logits.items()}
    metrics = {split: multilabel_metrics(torch.sigmoid(value).numpy(), labels[split].numpy(), list(names))
               for split, value in logits.items() if split != "train" and len(value)}
    return TrainedTeacher(outputs, metrics, None, [], {})


def _hgb_features(schema: TableSchema, rows: list[dict[str, Any]]) -> np.ndarray:
    encoded = schema.encode(rows)
    numbers = encoded["numbers"].numpy().copy()
    numbers[encoded["missing"][:, len(schema.categorical):].numpy().astype(bool)] = math.nan
    return np.concatenate([encoded["categories"].numpy().astype(float), numbers, encoded["missing"].numpy()], axis=1)
