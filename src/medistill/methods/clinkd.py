"""ClinKD (METHODS.md section 3): multi-task medical grounding on Qwen2-VL with MCG-RoPE, pseudo-label
distillation and Reflective Correction Training, on Med-GRIT-form data (VG, ROC, RC, MIA).

Stages, each a config section and a CLI step (`stage:` picks one; `medistill train --config FILE --set stage=...`):
- `sft`: supervised fine-tuning of `student` (or `teacher`, with `sft.model: teacher`): a from-scratch tiny
  Qwen2-VL whose tokenizer is trained on the training text, or a local Qwen2-VL directory (`pretrained`).
  Cross-entropy on the answer tokens only.
- `distill`: the student trained on `(alpha * KL + CE) / (1 + alpha)` against a frozen teacher checkpoint
  (`distill.teacher`) on the same teacher-forced sequences; KL per answer token at temperature T, mean over
  answer tokens (or sum), teacher vocabulary cut to the student's; optional confidence-margin curriculum.
- `rct`: Reflective Correction Training of a checkpoint (`rct.init`): generate on training samples, flag
  missing / wrong boxes and low MiniLM similarity to the truth, let a corrector that also sees the truth in
  its prompt sample candidates, keep the best by similarity + IoU, retrain on the corrected samples; rounds.
- `eval`: a checkpoint (`eval.checkpoint`) on the test split: greedy decoding, BiRD's metrics beside the
  centre-box / mean-box / majority baselines.
- `experiment` (what `medistill experiment clinkd` runs): teacher SFT, student SFT, student KD, student
  KD + RCT (and optional variants), each evaluated on test; `metrics.json` and `report.html`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medistill.config import OptimConfig, TrainConfig, register_recipe
from medistill.data.datasets import split_for_validation
from medistill.data.formats.base import open_dataset
from medistill.data.formats.med_grit import modality_of
from medistill.data.records import GROUNDING_TASKS, Box, Record
from medistill.data.privacy import case_id
from medistill.engine import distributed
from medistill.engine.distributed import main_only
from medistill.engine.logging import write_json
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.engine.trainer import Trainer, autocast, move_to, resolve_device, resolve_precision
from medistill.errors import UsageError
from medistill.losses.kd import token_kl
from medistill.methods import register_runner
from medistill.metrics.captioning import caption_metrics, clean
from medistill.metrics.grounding import (centre_box, format_box, majority_answer, parse_boxes, roc_accuracy,
                                         vg_recall)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
STAGES = ("experiment", "sft", "distill", "rct", "eval")
EXPERIMENT_MODELS = ("teacher", "student_sft", "student_sft_stock_rope", "student_sft_rct", "student_kd",
                     "student_kd_rct")
CAPTION_TASKS = ("RC", "MIA")
_REF = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)


# ----------------------------------------------------------------------------------------------- config
@dataclass
class GroundingDataConfig:
    """Med-GRIT-form conversations (BiRD, LLaVA or ShareGPT JSON + images/); one question-answer turn a sample."""

    format: str = "med-grit"
    root: str = "runs/phantom/med-grit"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the reader
    tasks: list[str] = field(default_factory=lambda: list(GROUNDING_TASKS))
    modalities: list[str] = field(default_factory=list)  # empty: every modality
    val_fraction: float = 0.1  # held out of train by image when the data has no val split
    max_train: int | None = None  # seeded random subsets, for quick runs
    max_val: int | None = None
    max_test: int | None = None


@dataclass
class GroundingModelConfig:
    """A tiny Qwen2-VL from scratch, or a local Qwen2-VL / Qwen2.5-VL directory (`pretrained`)."""

    pretrained: str | None = None
    vocab_size: int = 1024  # the tokenizer trained on the training text (from scratch only)
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None
    vision_depth: int = 2
    vision_embed: int = 64
    vision_heads: int = 4
    patch_size: int = 8
    merge_size: int = 2
    architecture: str = "qwen2_vl"  # qwen2_vl | qwen2_5_vl (from scratch)
    rope: str = "mcg"  # mcg (inter_gap / intra_stride) | stock (Qwen2-VL's own M-RoPE)
    inter_gap: list[int] = field(default_factory=lambda: [2, 2, 2])
    intra_stride: list[int] = field(default_factory=lambda: [1, 1])
    min_pixels: int | None = None  # image area bounds; None: the checkpoint's own, or 32*32 .. 64*64 from scratch
    max_pixels: int | None = None
    dtype: str | None = None  # weights of a pretrained checkpoint: bfloat16 | float16 | float32 (None: float32)
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2 (pretrained only)
    gradient_checkpointing: bool = False


@dataclass
class SFTConfig:
    model: str = "student"  # which section a standalone `stage: sft` trains: student | teacher
    epochs: int | None = None  # None: train.epochs
    lr: float | None = None  # None: optim.lr


@dataclass
class DistillConfig:
    """`(alpha * KL + CE) / (1 + alpha)`; the experiment distils from its own SFT teacher."""

    teacher: str | None = None  # a local checkpoint directory (standalone `stage: distill`)
    alpha: float = 0.5
    temperature: float = 0.5
    reduction: str = "mean"  # mean | sum of the per-token KL over answer tokens
    curriculum: str = "none"  # none | order (easy first) | weight, by the teacher's top-1 minus top-2 probability
    epochs: int | None = None
    lr: float | None = None


@dataclass
class RCTConfig:
    """Reflective Correction Training (reconstructed from the paper's figures; see docs/methods.md)."""

    init: str | None = None  # the checkpoint to correct (standalone `stage: rct`)
    rounds: int = 1
    epochs: int | None = None  # retraining epochs per round
    lr: float | None = None
    max_samples: int | None = None  # training samples checked per round (seeded subset); None: all
    iou_threshold: float = 0.5  # a box is wrong at IoU <= this
    similarity_threshold: float = 0.8  # MiniLM cosine below this is low
    encoder: str = "minilm-l6"  # sentence encoder: 'minilm-l6' or a local directory
    corrector: str = "self"  # self (the model being corrected) | teacher (the experiment's) | a checkpoint dir
    candidates: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    hint: str = "{question} Reference answer: {answer}"  # the corrector's prompt
    fallback: str = "truth"  # when no candidate passes: truth (train on the ground truth) | best | skip
    include_original: bool = True  # retrain on all training samples plus the corrected ones (else these only)


@dataclass
class GroundingEvalConfig:
    checkpoint: str | None = None  # standalone `stage: eval`
    split: str = "test"
    max_new_tokens: int = 80
    mia_max_new_tokens: int = 100
    batch_size: int = 32
    meteor: bool = True  # METEOR needs Java and takes seconds to start
    gallery: int = 6  # VG test samples drawn with true and predicted boxes


@dataclass
class ClinKDConfig:
    method: str = "clinkd"
    stage: str = "experiment"  # experiment | sft | distill | rct | eval
    models: list[str] = field(default_factory=lambda: ["teacher", "student_sft", "student_kd", "student_kd_rct"])
    data: GroundingDataConfig = field(default_factory=GroundingDataConfig)
    student: GroundingModelConfig = field(default_factory=GroundingModelConfig)
    teacher: GroundingModelConfig = field(default_factory=lambda: GroundingModelConfig(
        hidden=192, layers=3, heads=6, kv_heads=2, vision_depth=2, vision_embed=96, vision_heads=4))
    sft: SFTConfig = field(default_factory=SFTConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rct: RCTConfig = field(default_factory=RCTConfig)
    eval: GroundingEvalConfig = field(default_factory=GroundingEvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


register_recipe("clinkd", ClinKDConfig)


def _choice(value: str, allowed: Sequence[str], key: str) -> None:
    if value not in allowed:
        raise UsageError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")


def validate(config: ClinKDConfig) -> None:
    _choice(config.stage, STAGES, "stage")
    _choice(config.sft.model, ("student", "teacher"), "sft.model")
    d, r = config.distill, config.rct
    if d.alpha < 0 or d.temperature <= 0:
        raise UsageError(f"distill.alpha must be >= 0 and distill.temperature > 0 (got {d.alpha}, {d.temperature})")
    _choice(d.reduction, ("mean", "sum"), "distill.reduction")
    _choice(d.curriculum, ("none", "order", "weight"), "distill.curriculum")
    _choice(r.fallback, ("truth", "best", "skip"), "rct.fallback")
    for name, model in (("student", config.student), ("teacher", config.teacher)):
        _choice(model.rope, ("mcg", "stock"), f"{name}.rope")
        if len(model.inter_gap) != 3 or len(model.intra_stride) != 2:
            raise UsageError(f"{name}.inter_gap needs 3 and {name}.intra_stride 2 integers")
    if r.rounds < 0 or r.candidates < 1 or r.temperature <= 0 or not 0 < r.top_p <= 1:
        raise UsageError("rct.rounds must be >= 0, rct.candidates >= 1, rct.temperature > 0 and 0 < rct.top_p <= 1")
    if "{question}" not in r.hint or "{answer}" not in r.hint:
        raise UsageError("rct.hint must contain {question} and {answer}")
    unknown = [task for task in config.data.tasks if task not in GROUNDING_TASKS]
    if unknown or not config.data.tasks:
        raise UsageError(f"data.tasks must be a non-empty subset of {', '.join(GROUNDING_TASKS)}; unknown: {unknown}")
    _choice(config.eval.split, ("train", "val", "test"), "eval.split")
    if config.stage == "experiment":
        unknown = [name for name in config.models if name not in EXPERIMENT_MODELS]
        if unknown or not config.models:
            raise UsageError(f"models must be a non-empty subset of {', '.join(EXPERIMENT_MODELS)}; unknown: {unknown}")
        if "student_kd" in config.models and "teacher" not in config.models and not d.teacher:
            raise UsageError("models has student_kd but neither teacher nor distill.teacher: add one")
        for name, needs in (("student_kd_rct", "student_kd"), ("student_sft_rct", "student_sft")):
            if name in config.models and needs not in config.models:
                raise UsageError(f"models has {name} but not {needs}, which it starts from")
        if r.corrector == "teacher" and "teacher" not in config.models and not d.teacher:
            raise UsageError("rct.corrector=teacher needs the teacher in models or distill.teacher")
    needs = {"distill": ("distill.teacher", d.teacher), "eval": ("eval.checkpoint", config.eval.checkpoint),
             "rct": ("rct.init", r.init or config.student.pretrained)}
    if config.stage in needs and not needs[config.stage][1]:
        key = needs[config.stage][0]
        raise UsageError(f"stage {config.stage} needs {key}: --set {key}=DIR (a checkpoint directory)")
    if config.stage == "rct" and r.corrector == "teacher" and not d.teacher:
        raise UsageError("rct.corrector=teacher in a standalone rct stage needs distill.teacher=DIR")


# ------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Sample:
    """One question-answer turn about one image."""

    uid: str
    image: str
    question: str
    answer: str
    task: str
    modality: str  # BiRD's grouping: the image file name's prefix
    weight: float = 1.0

    @property
    def image_id(self) -> str:
        """The image's name as BiRD groups it, by its file-name prefix: prefixed with the modality when the
        file is named otherwise (NIH's `00000013_005` becomes `x_ray_00000013_005`)."""
        stem = Path(self.image).stem
        return stem if modality_of(stem) == self.modality else f"{self.modality}_{stem}"


def _sample(record: Record) -> Sample:
    if record.image is None:
        raise UsageError(f"record {record.uid} has no image; grounding samples need one")
    if len(record.conversations) != 1:
        raise UsageError(f"record {record.uid}: expected one question-answer turn, got {len(record.conversations)}")
    turn = record.conversations[0]
    return Sample(record.uid, record.image, turn.question, turn.answer, record.task or "MIA",
                  record.modality or modality_of(Path(record.image).stem) or "unknown")


def _cap(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    if limit is None or len(samples) <= limit:
        return samples
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]


def load_samples(config: ClinKDConfig) -> dict[str, list[Sample]]:
    """Train / val / test samples of the configured tasks and modalities (val held out of train by image)."""
    data = config.data
    reader = open_dataset(data.format, data.root, **data.options)
    records = [r for r in reader.records() if r.task in data.tasks and
               (not data.modalities or modality_of(Path(r.image or "").stem) in data.modalities)]
    if not records:
        raise UsageError(f"no {'/'.join(data.tasks)} samples in {data.root} (format {data.format}): check data.root, "
                         "data.tasks and data.modalities")
    train, val = split_for_validation([r for r in records if r.split in ("train", "val")], data.val_fraction)
    test = [r for r in records if r.split == "test"]
    seed = config.train.seed
    splits = {"train": _cap([_sample(r) for r in train], data.max_train, seed),
              "val": _cap([_sample(r) for r in val], data.max_val, seed + 1),
              "test": _cap([_sample(r) for r in test], data.max_test, seed + 2)}
    if not splits["train"]:
        raise UsageError(f"{data.root} has no training samples")
    log.info("samples: %s", {name: len(part) for name, part in splits.items()})
    return splits


class SampleList(Dataset):
    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


# --------------------------------------------------------------------------------------------- models
@dataclass
class Grounder:
    """A grounding model with its tokenizer and image preprocessing."""

    model: Any
    tokenizer: Any
    processor: Any

    def encode(self, samples: Sequence[Sample], *, answers: bool, questions: Sequence[str] | None = None,
               padding_side: str = "right") -> dict[str, torch.Tensor]:
        from medistill.models.grounding.model import encode_batch

        return encode_batch(self.tokenizer, self.processor, [s.image for s in samples],
                            list(questions) if questions is not None else [s.question for s in samples],
                            [s.answer for s in samples] if answers else None, padding_side=padding_side,
                            uids=[s.uid for s in samples])

    def save(self, directory: Path) -> Path:
        """Rank 0 writes; every rank returns once it is written (all ranks call this at the same point)."""
        from medistill.models.grounding.model import save_grounding_model

        full = distributed.full_state_dict(self.model) if distributed.is_sharded(self.model) else None
        save_grounding_model(directory, self.model, self.tokenizer, self.processor, state_dict=full)
        distributed.barrier()
        return directory

    @property
    def end_token_id(self) -> int:
        from medistill.models.grounding.tokenizer import prompt_style

        return int(self.tokenizer.convert_tokens_to_ids(prompt_style(self.tokenizer).end))


def _gaps(cfg: GroundingModelConfig) -> dict[str, list[int]]:
    if cfg.rope == "stock":
        return {"inter_gap": [1, 1, 1], "intra_stride": [1, 1]}
    return {"inter_gap": list(cfg.inter_gap), "intra_stride": list(cfg.intra_stride)}


def train_grounding_tokenizer(samples: Sequence[Sample], vocab_size: int) -> Any:
    from medistill.models.grounding.tokenizer import train_tokenizer

    return train_tokenizer([text for s in samples for text in (s.question, s.answer)], vocab_size=vocab_size)


def build_grounder(cfg: GroundingModelConfig, tokenizer: Any | None, seed: int) -> Grounder:
    """`cfg.pretrained` loaded (its tokenizer and preprocessing), or a from-scratch model for `tokenizer`."""
    from medistill.models.grounding.model import (GroundingImageProcessor, create_grounding_model,
                                                  load_grounding_model, tiny_qwen2vl_config)
    from medistill.models.grounding.tokenizer import load_tokenizer, special_token_ids

    sizes = {key: value for key, value in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels))
             if value is not None}
    if cfg.pretrained:
        kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = load_grounding_model(cfg.pretrained, mcg_rope=_gaps(cfg), dtype=cfg.dtype, **kwargs)
        tokenizer = load_tokenizer(cfg.pretrained)
        processor = replace(GroundingImageProcessor.from_pretrained(cfg.pretrained, model.config), **sizes)
    else:
        if tokenizer is None:
            raise UsageError("a from-scratch model needs a tokenizer trained on the training text")
        config = tiny_qwen2vl_config(
            len(tokenizer), **special_token_ids(tokenizer), hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
            kv_heads=cfg.kv_heads, intermediate=cfg.intermediate, vision_depth=cfg.vision_depth,
            vision_embed=cfg.vision_embed, vision_heads=cfg.vision_heads, patch_size=cfg.patch_size,
            merge_size=cfg.merge_size, architecture=cfg.architecture, **_gaps(cfg))
        torch.manual_seed(seed)
        model = create_grounding_model(config)
        processor = GroundingImageProcessor.for_model(config, **({"min_pixels": 32 * 32, "max_pixels": 64 * 64}
                                                                 | sizes))
    if cfg.gradient_checkpointing:
        _checkpoint_activations(model)
    return Grounder(model, tokenizer, processor)


def load_grounder(directory: str | Path, cfg: GroundingModelConfig | None = None) -> Grounder:
    """A saved checkpoint directory (ours, or any local Qwen2-VL) with the MCG gaps and preprocessing it was
    saved with; `cfg` adds its weight dtype, attention implementation and gradient checkpointing."""
    from medistill.models.grounding.model import load_grounding_checkpoint

    kwargs: dict[str, Any] = {}
    if cfg is not None and cfg.dtype:
        kwargs["dtype"] = cfg.dtype
    if cfg is not None and cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model, tokenizer, processor = load_grounding_checkpoint(directory, **kwargs)
    if cfg is not None and cfg.gradient_checkpointing:
        _checkpoint_activations(model)
    return Grounder(model, tokenizer, processor)


def _checkpoint_activations(model: Any) -> None:
    """Recompute activations in the backward pass (transformers >= 5 renamed gradient to activation
    checkpointing and deprecated the old name)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_same_tokenizer(student: Any, teacher: Any) -> None:
    """Distillation compares token distributions: both models must number their tokens alike."""
    teacher_vocab = teacher.get_vocab()
    different = [token for token, index in student.get_vocab().items() if teacher_vocab.get(token) != index]
    if different:
        raise UsageError(f"the teacher's tokenizer numbers {len(different)} of the student's tokens differently "
                         f"(e.g. {different[:3]}): distil between models that share a tokenizer (for a "
                         "from-scratch student, leave student.pretrained unset to reuse the teacher's)")


# ------------------------------------------------------------------------------------------- losses
def answer_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict answer tokens (tokens, vocabulary), those tokens, and each one's sample index.

    The logits at position t predict the token at t + 1; labels are -100 outside the answer.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits[:, :-1][mask], targets[mask], mask.nonzero()[:, 0]


def _weighted(values: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weights is None:
        weights = torch.ones_like(values)
    total = (values * weights).sum()
    return total if reduction == "sum" else total / weights.sum().clamp(min=1e-12)


def clinkd_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                teacher_labels: torch.Tensor | None = None, *, alpha: float = 0.5, temperature: float = 0.5,
                reduction: str = "mean", weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ClinKD's loss terms: `ce` = CE / (1 + alpha) and `kd` = alpha * KL / (1 + alpha) (their sum is the loss).

    CE is the mean over answer tokens; KL the forward KL(teacher_T || student_T) per answer token, its mean
    (`reduction="mean"`) or sum over the answer tokens. `weights` (batch,) weigh each sample's tokens. The
    teacher may see a differently long sequence (other image tokens): its answer tokens must be the same.
    Without a teacher: `ce` alone, unscaled.
    """
    student, targets, rows = answer_positions(student_logits, labels)
    token_weights = None if weights is None else weights.to(student.device, torch.float32)[rows]
    ce = _weighted(F.cross_entropy(student.float(), targets, reduction="none"), token_weights, "mean")
    if teacher_logits is None:
        return {"ce": ce}
    teacher, teacher_targets, _ = answer_positions(teacher_logits, labels if teacher_labels is None else teacher_labels)
    if not torch.equal(teacher_targets, targets):
        raise UsageError("teacher and student see different answer tokens: distil between models that share a "
                         "tokenizer and prompt form")
    kl = _weighted(token_kl(student, teacher, temperature), token_weights, reduction)
    return {"ce": ce / (1 + alpha), "kd": alpha * kl / (1 + alpha)}


def confidence_margin(teacher_logits: torch.Tensor, labels: torch.Tensor,
                      vocabulary: int | None = None) -> torch.Tensor:
    """Per sample: the mean over its answer tokens of the teacher's top-1 minus top-2 probability (0 when the
    sample has no answer token); the vocabulary cut to `vocabulary` entries first (the student's)."""
    logits, _, rows = answer_positions(teacher_logits, labels)
    if vocabulary is not None:
        logits = logits[..., :vocabulary]
    top = logits.float().softmax(-1).topk(2, dim=-1).values
    margins = top[:, 0] - top[:, 1]
    batch = labels.shape[0]
    total = torch.zeros(batch, device=margins.device).index_add_(0, rows, margins)
    count = torch.zeros(batch, device=margins.device).index_add_(0, rows, torch.ones_like(margins))
    return total / count.clamp(min=1)


# ------------------------------------------------------------------------------------------- training
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
TEACHER = "teacher/"


def _inputs(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    return {key: batch[prefix + key] for key in MODEL_INPUTS}


class Collate:
    """Samples to student inputs (+ labels, weights, uids) and, when its preprocessing differs, the teacher's."""

    def __init__(self, student: Grounder, teacher: Grounder | None = None) -> None:
        self.student = student
        self.teacher = teacher if teacher is not None and teacher.processor != student.processor else None

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        batch: dict[str, Any] = dict(self.student.encode(samples, answers=True))
        batch["weight"] = torch.tensor([s.weight for s in samples], dtype=torch.float32)
        batch["uid"] = [s.uid for s in samples]
        if self.teacher is not None:
            batch |= {TEACHER + key: value for key, value in self.teacher.encode(samples, answers=True).items()}
        return batch


class GroundingTask:
    """SFT (no teacher) or ClinKD distillation (a frozen teacher) of one grounding model."""

    def __init__(self, student: Grounder, val: Sequence[Sample], config: ClinKDConfig,
                 teacher: Grounder | None = None) -> None:
        self.grounder = student
        self.model: nn.Module = student.model
        self.val = list(val)
        self.config = config
        self.teacher = teacher
        self.collate = Collate(student, teacher)
        if teacher is not None:
            teacher.model.requires_grad_(False)
            teacher.model.eval()

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(**_inputs(batch), use_cache=False).logits
        if self.teacher is None:
            return clinkd_loss(logits, batch["labels"], weights=batch["weight"])
        prefix = TEACHER if TEACHER + "input_ids" in batch else ""
        teacher = self.teacher.model
        teacher.to(logits.device).eval()  # the trainer's train() never reaches it: it is not part of `model`
        with torch.no_grad():
            teacher_logits = teacher(**_inputs(batch, prefix), use_cache=False).logits
        d = self.config.distill
        return clinkd_loss(logits, batch["labels"], teacher_logits, batch[prefix + "labels"], alpha=d.alpha,
                           temperature=d.temperature, reduction=d.reduction, weights=batch["weight"])

    def evaluate(self, split: str) -> dict[str, float]:
        """Teacher-forced answer loss and next-token accuracy on the validation samples (cheap; the generated
        answers are scored on test after training)."""
        if split != "val" or not self.val:
            return {}
        device = next(self.model.parameters()).device
        loss = correct = tokens = 0.0
        size = self.config.train.eval_batch_size
        for start in range(0, len(self.val), size):
            batch = move_to(self.grounder.encode(self.val[start:start + size], answers=True), device)
            logits, targets, _ = answer_positions(self.model(**_inputs(batch), use_cache=False).logits,
                                                  batch["labels"])
            loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += float((logits.argmax(-1) == targets).sum())
            tokens += targets.numel()
        return {"loss": loss / max(tokens, 1), "token_accuracy": correct / max(tokens, 1)}

    def checkpoint_module(self) -> nn.Module:
        return self.model

    def checkpoint_config(self) -> dict[str, Any]:  # replaced by the Hugging Face directory after training
        return {"kind": "grounding", "method": "clinkd"}


class OrderedTrainer(Trainer):
    """The trainer with a fixed sample order every epoch (the confidence-margin curriculum, easy first)."""

    def __init__(self, *args: Any, order: Sequence[int], **kwargs: Any) -> None:
        self.order = list(order)  # before the base class counts the batches of an epoch
        super().__init__(*args, **kwargs)

    def batches_of_epoch(self, epoch: int) -> list[list[int]]:
        size = self.cfg.batch_size
        return [self.order[i:i + size] for i in range(0, len(self.order), size)]


def _stage_settings(config: ClinKDConfig, epochs: int | None, lr: float | None) -> tuple[TrainConfig, OptimConfig]:
    train = TrainConfig(**{**vars(config.train), "epochs": config.train.epochs if epochs is None else epochs})
    optim = OptimConfig(**{**vars(config.optim), "lr": config.optim.lr if lr is None else lr})
    return train, optim


def train_grounder(grounder: Grounder, run: RunDir, train: Sequence[Sample], val: Sequence[Sample],
                   config: ClinKDConfig, *, epochs: int | None, lr: float | None,
                   teacher: Grounder | None = None, order: Sequence[int] | None = None) -> Grounder:
    """Train `grounder` in `run` (resumable) and save it as a Hugging Face directory in `run/checkpoints`."""
    task = GroundingTask(grounder, val, config, teacher)
    settings, optim = _stage_settings(config, epochs, lr)
    data = SampleList(train)
    if order is not None:
        trainer: Trainer = OrderedTrainer(task, data, settings, optim, run, collate=task.collate, order=order)
    else:
        trainer = Trainer(task, data, settings, optim, run, collate=task.collate)
    trainer.fit(resume=run.train_state.exists())
    grounder.save(run.checkpoint_dir)
    return grounder


@torch.no_grad()
def teacher_margins(teacher: Grounder, samples: Sequence[Sample], vocabulary: int, batch_size: int,
                    device: torch.device, dtype: torch.dtype | None) -> list[float]:
    """The teacher's confidence margin of every sample (teacher forcing on the ground truth)."""
    model = teacher.model.to(device).eval()
    margins: list[float] = []
    for start in range(0, len(samples), batch_size):
        batch = move_to(teacher.encode(samples[start:start + batch_size], answers=True), device)
        with autocast(device, dtype):
            logits = model(**_inputs(batch), use_cache=False).logits
        margins += confidence_margin(logits, batch["labels"], vocabulary).tolist()
    return margins


def distill(student: Grounder, teacher: Grounder, run: RunDir, splits: dict[str, list[Sample]],
            config: ClinKDConfig) -> Grounder:
    """The distillation stage: ClinKD's loss against the frozen teacher, with the optional curriculum."""
    check_same_tokenizer(student.tokenizer, teacher.tokenizer)
    d = config.distill
    train, order = splits["train"], None
    if d.curriculum != "none":
        device = resolve_device(config.train.device)
        dtype = resolve_precision(config.train.precision, device)
        vocabulary = int(student.model.config.get_text_config().vocab_size)
        margins = teacher_margins(teacher, train, vocabulary, config.train.eval_batch_size, device, dtype)
        write_json(run.path / "margins.json", list(margins))  # in training-sample order
        if d.curriculum == "order":
            order = sorted(range(len(train)), key=lambda i: -margins[i])
        else:
            mean = sum(margins) / len(margins)
            train = [replace(s, weight=m / mean if mean > 0 else 1.0) for s, m in zip(train, margins)]
        log.info("confidence margins: mean %.3f, min %.3f, max %.3f (%s)", sum(margins) / len(margins),
                 min(margins), max(margins), d.curriculum)
    log.info("distilling (alpha %.2f, T %.2f, %s KL) on %d samples", d.alpha, d.temperature, d.reduction, len(train))
    return train_grounder(student, run, train, splits["val"], config, epochs=d.epochs, lr=d.lr, teacher=teacher,
                          order=order)


# ----------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class Sampling:
    candidates: int = 1
    temperature: float = 1.0
    top_p: float = 1.0


@torch.no_grad()
def generate(grounder: Grounder, samples: Sequence[Sample], *, budget: Callable[[Sample], int], batch_size: int,
             device: torch.device, dtype: torch.dtype | None, sampling: Sampling | None = None,
             questions: Sequence[str] | None = None) -> list[list[str]]:
    """Answers of every sample (Med-GRIT box form): one greedy answer each, or `sampling.candidates` samples.

    `budget(sample)` is the new-token limit; samples with equal limits are batched together.
    `questions` replaces the samples' questions (the corrector's hinted prompts).
    """
    from medistill.models.grounding.model import vision_token_ids
    from medistill.models.grounding.tokenizer import decode_answers

    model = grounder.model.to(device)
    was_training = model.training
    model.eval()
    count = sampling.candidates if sampling else 1
    settings: dict[str, Any] = {"do_sample": False} if sampling is None else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
        "num_return_sequences": count}
    answers: list[list[str]] = [[] for _ in samples]
    groups: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(budget(sample), []).append(index)
    for limit, indices in sorted(groups.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            prompts = None if questions is None else [questions[i] for i in chunk]
            inputs = move_to(grounder.encode([samples[i] for i in chunk], answers=False, questions=prompts,
                                             padding_side="left"), device)
            inputs.pop("labels")
            with autocast(device, dtype):
                out = model.generate(**inputs, max_new_tokens=limit, eos_token_id=grounder.end_token_id,
                                     pad_token_id=grounder.tokenizer.pad_token_id, use_cache=True,
                                     suppress_tokens=vision_token_ids(model.config), **settings)
            texts = decode_answers(grounder.tokenizer, out, inputs["input_ids"].shape[1])
            for row, index in enumerate(chunk):
                answers[index] = texts[row * count:(row + 1) * count]
    model.train(was_training)
    return answers


def _budget(config: ClinKDConfig) -> Callable[[Sample], int]:
    e = config.eval
    return lambda sample: e.mia_max_new_tokens if sample.task == "MIA" else e.max_new_tokens


# ------------------------------------------------------------------------------------------ evaluation
def _valid_boxes(text: str) -> list[Box]:
    return [box for box in parse_boxes(text) if box is not None]


def score_answers(predictions: Sequence[str], samples: Sequence[Sample], *, meteor: bool) -> dict[str, Any]:
    """BiRD's metrics of one prediction per sample: VG recall@0.5, ROC accuracy, RC / MIA caption scores."""
    scores: dict[str, Any] = {}
    for task in GROUNDING_TASKS:
        chosen = [(p, s) for p, s in zip(predictions, samples) if s.task == task]
        if not chosen:
            continue
        preds, refs = [p for p, _ in chosen], [s.answer for _, s in chosen]
        if task == "VG":
            scores[task] = vg_recall(preds, refs, [s.image_id for _, s in chosen])
        elif task == "ROC":
            scores[task] = roc_accuracy(preds, refs, [s.image_id for _, s in chosen])
        else:
            scores[task] = caption_metrics(preds, refs, [s.modality for _, s in chosen], meteor=meteor)
    return scores


def _ref_name(question: str) -> str:
    found = _REF.findall(question)
    return found[0].strip().lower() if found else ""


def baselines(train: Sequence[Sample], test: Sequence[Sample]) -> dict[str, Any]:
    """VG with the centre box and with the mean training box of the phrase's class; ROC with the majority
    training answer; scored on `test` exactly as the models are."""
    result: dict[str, Any] = {}
    vg = [s for s in test if s.task == "VG"]
    if vg:
        centre = format_box(centre_box())
        sums: dict[str, list[float]] = {}
        for sample in (s for s in train if s.task == "VG"):
            for box in _valid_boxes(sample.answer):
                entry = sums.setdefault(_ref_name(sample.question), [0.0] * 5)
                for i, value in enumerate((box.x1, box.y1, box.x2, box.y2, 1.0)):
                    entry[i] += value
        means = {name: format_box(Box(*(v / entry[4] for v in entry[:4]))) for name, entry in sums.items()}
        image_ids = [s.image_id for s in vg]
        refs = [s.answer for s in vg]
        result["VG"] = {
            "centre_box": vg_recall([centre] * len(vg), refs, image_ids),
            "mean_box": vg_recall([means.get(_ref_name(s.question), centre) for s in vg], refs, image_ids)}
    roc = [s for s in test if s.task == "ROC"]
    roc_train = [s.answer for s in train if s.task == "ROC"]
    if roc and roc_train:
        answer = majority_answer(roc_train)
        result["ROC"] = {"majority": {**roc_accuracy([answer] * len(roc), [s.answer for s in roc],
                                                     [s.image_id for s in roc]), "answer": answer}}
    return result


def evaluate_grounder(grounder: Grounder, samples: Sequence[Sample], config: ClinKDConfig) -> dict[str, Any]:
    """Greedy answers on `samples`, BiRD's metrics, and the first VG / other examples for the report."""
    started = time.perf_counter()
    device = resolve_device(config.train.device)
    dtype = resolve_precision(config.train.precision, device)
    predictions = [a[0] for a in generate(grounder, samples, budget=_budget(config), batch_size=config.eval.batch_size,
                                          device=device, dtype=dtype)]
    metrics = score_answers(predictions, samples, meteor=config.eval.meteor)
    examples = [{"case": case_id(s.uid), "image": s.image, "task": s.task, "question": s.question, "answer": s.answer,
                 "prediction": p} for s, p in zip(samples, predictions)]
    vg = [e for e in examples if e["task"] == "VG"][:config.eval.gallery]
    others = [e for task in ("ROC", "RC", "MIA") for e in [x for x in examples if x["task"] == task][:2]]
    return {**metrics, "samples": len(samples), "examples": vg + others, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------- RCT
def box_quality(prediction: str, truth: str) -> float | None:
    """Mean over the truth's boxes of the best IoU with a predicted box (0 without one); None when the truth
    holds no box."""
    truths = _valid_boxes(truth)
    if not truths:
        return None
    guesses = _valid_boxes(prediction)
    return sum(max((g.iou(t) for g in guesses), default=0.0) for t in truths) / len(truths)


def flag_reasons(prediction: str, truth: str, similarity: float, *, iou_threshold: float = 0.5,
                 similarity_threshold: float = 0.8) -> list[str]:
    """Why an answer needs correcting: `missing_box` (the truth has boxes, the answer no valid one),
    `wrong_box` (a truth box has no predicted box with IoU > threshold), `low_similarity`."""
    reasons = []
    truths = _valid_boxes(truth)
    if truths:
        guesses = _valid_boxes(prediction)
        if not guesses:
            reasons.append("missing_box")
        elif any(max(g.iou(t) for g in guesses) <= iou_threshold for t in truths):
            reasons.append("wrong_box")
    if similarity < similarity_threshold:
        reasons.append("low_similarity")
    return reasons


def candidate_score(candidate: str, truth: str, similarity: float) -> float:
    """Semantic-aware selection: similarity to the truth plus the box quality (IoU) when the truth has boxes."""
    quality = box_quality(candidate, truth)
    return similarity + (quality or 0.0)


def select_candidate(candidates: Sequence[str], truth: str, similarities: Sequence[float]) -> tuple[int, float]:
    """The index and score of the best candidate (the first among equals)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    scores = [candidate_score(c, truth, s) for c, s in zip(candidates, similarities)]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return best, scores[best]


class Similarity:
    """Cosine similarity of MiniLM sentence embeddings of answer texts (tags and boxes dropped); empty = 0."""

    def __init__(self, encoder: str) -> None:
        from medistill.models.text import TextEncoder

        self.encoder = TextEncoder(encoder, max_length=128)

    def __call__(self, texts: Sequence[str], references: Sequence[str]) -> list[float]:
        left, right = [clean(t) for t in texts], [clean(t) for t in references]
        unique = sorted({t for t in (*left, *right) if t})
        if not unique:
            return [0.0] * len(left)
        embeddings = F.normalize(self.encoder.encode(unique), dim=-1)
        position = {text: i for i, text in enumerate(unique)}
        return [float(embeddings[position[a]] @ embeddings[position[b]]) if a and b else 0.0
                for a, b in zip(left, right)]


def correct_samples(grounder: Grounder, corrector: Grounder, samples: Sequence[Sample], similarity: Similarity,
                    config: ClinKDConfig, seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One RCT pass over `samples`: flag, sample candidates with the truth in the prompt, keep the best.

    Returns the corrections (one per flagged sample that is kept, `index` = its position in `samples`) and
    the counts.
    """
    r = config.rct
    device = resolve_device(config.train.device)
    dtype = resolve_precision(config.train.precision, device)
    size = config.eval.batch_size
    predictions = [a[0] for a in generate(grounder, samples, budget=_budget(config), batch_size=size, device=device,
                                          dtype=dtype)]
    similarities = similarity(predictions, [s.answer for s in samples])
    flagged = []
    counts = {"checked": len(samples), "flagged": 0, "missing_box": 0, "wrong_box": 0, "low_similarity": 0,
              "corrected": 0, "fallback": 0, "skipped": 0}
    positions = {id(sample): index for index, sample in enumerate(samples)}
    for sample, prediction, sim in zip(samples, predictions, similarities):
        reasons = flag_reasons(prediction, sample.answer, sim, iou_threshold=r.iou_threshold,
                               similarity_threshold=r.similarity_threshold)
        if reasons:
            flagged.append((sample, prediction, reasons))
            counts["flagged"] += 1
            for reason in reasons:
                counts[reason] += 1
    if not flagged:
        return [], counts
    torch.manual_seed(seed)
    hinted = [r.hint.format(question=s.question, answer=s.answer) for s, _, _ in flagged]
    candidates = generate(corrector, [s for s, _, _ in flagged], budget=_budget(config), device=device, dtype=dtype,
                          batch_size=max(1, size // r.candidates), questions=hinted,
                          sampling=Sampling(r.candidates, r.temperature, r.top_p))
    flat = [c for group in candidates for c in group]
    truths = [s.answer for (s, _, _), group in zip(flagged, candidates) for _ in group]
    flat_similarity = similarity(flat, truths)
    corrections = []
    offset = 0
    for (sample, prediction, reasons), group in zip(flagged, candidates):
        sims = flat_similarity[offset:offset + len(group)]
        offset += len(group)
        best, score = select_candidate(group, sample.answer, sims)
        passes = not flag_reasons(group[best], sample.answer, sims[best], iou_threshold=r.iou_threshold,
                                  similarity_threshold=r.similarity_threshold)
        if passes:
            answer, source = group[best], "candidate"
            counts["corrected"] += 1
        elif r.fallback == "truth":
            answer, source = sample.answer, "truth"
            counts["fallback"] += 1
        elif r.fallback == "best" and group[best].strip():
            answer, source = group[best], "best"
            counts["fallback"] += 1
        else:
            counts["skipped"] += 1
            continue
        corrections.append({"index": positions[id(sample)], "case": case_id(sample.uid), "reasons": reasons, "prediction": prediction, "answer": answer,
                            "source": source, "score": score, "candidates": group})
    return corrections, counts


def reflective_correction(grounder: Grounder, run: RunDir, splits: dict[str, list[Sample]], config: ClinKDConfig,
                          corrector_dir: Path | None = None) -> tuple[Grounder, list[dict[str, Any]]]:
    """`rct.rounds` rounds of flag / correct / retrain; each round resumable in `run/round{k}`.

    `corrector_dir`: a checkpoint that corrects (None: the model corrects itself). The final model is saved
    in `run/checkpoints`.
    """
    r = config.rct
    train = splits["train"]
    similarity: Similarity | None = None
    settings = replace(config.teacher, gradient_checkpointing=False)
    corrector = None if corrector_dir is None else load_grounder(corrector_dir, settings)
    rounds = []
    for k in range(1, r.rounds + 1):
        round_run = RunDir(prepare_output_dir(run.path / f"round{k}", resume=True))
        saved = round_run.path / "corrections.json"
        started = time.perf_counter()
        checked = _cap(train, r.max_samples, config.train.seed + 1000 * k)  # the same on resuming
        if saved.is_file():
            outcome = json.loads(saved.read_text(encoding="utf-8"))
        else:
            similarity = similarity or Similarity(r.encoder)
            log.info("RCT round %d: checking %d training samples", k, len(checked))
            corrections, counts = correct_samples(grounder, corrector or grounder, checked, similarity, config,
                                                  config.train.seed + k)
            outcome = {"counts": {**counts, "seconds_correcting": time.perf_counter() - started},
                       "corrections": corrections}
            write_json(saved, outcome)
        counts = outcome["counts"]
        log.info("RCT round %d: %d of %d flagged, %d corrected, %d fallback", k, counts["flagged"], counts["checked"],
                 counts["corrected"], counts["fallback"])
        corrected = [replace(checked[c["index"]], uid=f"{checked[c['index']].uid}#rct{k}", answer=c["answer"])
                     for c in outcome["corrections"]]
        round_train = (list(train) if r.include_original else []) + corrected
        if corrected or r.include_original:
            grounder = train_grounder(grounder, round_run, round_train, splits["val"], config, epochs=r.epochs, lr=r.lr)
        rounds.append({"round": k, **counts, "trained_on": len(round_train) if corrected or r.include_original else 0})
    grounder.save(run.checkpoint_dir)
    return grounder, rounds


# ------------------------------------------------------------------------------------------- gallery
GREEN, RED = (64, 220, 64), (255, 64, 64)


def _draw_box(rgb: np.ndarray, box: Box, colour: Sequence[int]) -> None:
    """A 1-pixel rectangle of a 0-1000 grid box on an (H, W, 3) image, in place."""
    height, width = rgb.shape[:2]
    x1, x2 = (min(width - 1, max(0, round(v * width / 1000))) for v in (box.x1, box.x2))
    y1, y2 = (min(height - 1, max(0, round(v * height / 1000))) for v in (box.y1, box.y2))
    rgb[y1:y2 + 1, [x1, x2]] = colour
    rgb[[y1, y2], x1:x2 + 1] = colour


def draw_prediction(image: str, truth: str, prediction: str, size: int = 192) -> bytes:
    """The image with the true boxes in green and the predicted ones in red, as PNG."""
    from medistill.data.imaging import load_image
    from medistill.explain.overlay import png_bytes, to_rgb

    grey = load_image(image)
    scale = max(1, size // max(grey.shape))
    rgb = to_rgb(grey).repeat(scale, axis=0).repeat(scale, axis=1)
    for box in _valid_boxes(truth):
        _draw_box(rgb, box, GREEN)
    for box in _valid_boxes(prediction):
        _draw_box(rgb, box, RED)
    return png_bytes(rgb)


@main_only
def save_gallery(directory: Path, results: dict[str, dict[str, Any]]) -> None:
    """`gallery/{model}-{k}.png` for each model's VG examples, with `captions.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    captions = []
    for name, result in results.items():
        for k, example in enumerate(e for e in result.get("examples", []) if e["task"] == "VG"):
            file = f"{name}-{k}.png"
            (directory / file).write_bytes(draw_prediction(example["image"], example["answer"], example["prediction"]))
            quality = box_quality(example["prediction"], example["answer"])
            captions.append({"file": file, "model": name, "index": k, "case": example["case"],
                             "question": example["question"], "prediction": example["prediction"],
                             "iou": quality})
    write_json(directory / "captions.json", captions)


# ----------------------------------------------------------------------------------------------- stages
def _tokenizer_for(cfg: GroundingModelConfig, splits: dict[str, list[Sample]], directory: Path) -> Any:
    """None for a pretrained model (it brings its own), else the tokenizer saved in `directory` or trained."""
    if cfg.pretrained:
        return None
    from medistill.models.grounding.tokenizer import load_tokenizer

    if (directory / "tokenizer.json").is_file():
        return load_tokenizer(directory)
    if distributed.is_main():
        train_grounding_tokenizer(splits["train"], cfg.vocab_size).save_pretrained(str(directory))
    distributed.barrier()  # every rank then uses the one rank 0 trained and saved
    return load_tokenizer(directory)


def _free(*grounders: Grounder | None) -> None:
    for grounder in grounders:
        if grounder is not None:
            grounder.model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate_into(name: str, grounder: Grounder, splits: dict[str, list[Sample]], config: ClinKDConfig,
                   run: RunDir, results: dict[str, dict[str, Any]]) -> None:
    log.info("evaluating %s on %d %s samples", name, len(splits[config.eval.split]), config.eval.split)
    results[name] = evaluate_grounder(grounder, splits[config.eval.split], config)
    write_json(run.path / "test_metrics.json", _without_image_paths(results[name]))
    run.log.write("evaluated", model=name, **headline(results[name]))


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The summary numbers of one model: VG recall, ROC accuracy, RC / MIA mBMR (means over modalities)."""
    return {"VG/recall": result.get("VG", {}).get("mean"), "ROC/accuracy": result.get("ROC", {}).get("mean"),
            **{f"{task}/mBMR": result.get(task, {}).get("mean", {}).get("mBMR") for task in CAPTION_TASKS}}


def run_experiment(config: ClinKDConfig, run: RunDir) -> dict[str, Any]:
    started = time.perf_counter()
    splits = load_samples(config)
    seed = config.train.seed
    shared: list[Any] = []

    def tokenizer_for(cfg: GroundingModelConfig, teacher: bool) -> Any:
        """From-scratch models share one tokenizer trained on the training text, or a pretrained teacher's."""
        if cfg.pretrained:
            return None
        if not teacher and config.teacher.pretrained and "teacher" in config.models:
            from medistill.models.grounding.tokenizer import load_tokenizer

            return load_tokenizer(config.teacher.pretrained)
        if not shared:
            shared.append(_tokenizer_for(cfg, splits, run.path / "tokenizer"))
        return shared[0]

    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    rct_rounds: dict[str, list[dict[str, Any]]] = {}
    stage_dir: dict[str, Path] = {}

    def stage(name: str) -> RunDir:
        stage_dir[name] = run.path / name
        return RunDir(prepare_output_dir(stage_dir[name], resume=True))

    def sft(name: str, cfg: GroundingModelConfig) -> None:
        clock = time.perf_counter()
        log.info("%s: supervised fine-tuning", name)
        sub = stage(name)
        grounder = train_grounder(build_grounder(cfg, tokenizer_for(cfg, name == "teacher"), seed), sub,
                                  splits["train"], splits["val"], config, epochs=config.sft.epochs, lr=config.sft.lr)
        _evaluate_into(name, grounder, splits, config, sub, results)
        _free(grounder)
        seconds[name] = time.perf_counter() - clock

    if "teacher" in config.models:
        sft("teacher", config.teacher)
    teacher_dir = stage_dir["teacher"] / "checkpoints" if "teacher" in config.models else \
        (Path(config.distill.teacher) if config.distill.teacher else None)
    if "student_sft" in config.models:
        sft("student_sft", config.student)
    if "student_sft_stock_rope" in config.models:
        sft("student_sft_stock_rope", replace(config.student, rope="stock"))
    if "student_kd" in config.models:
        clock = time.perf_counter()
        assert teacher_dir is not None
        teacher = load_grounder(teacher_dir, config.teacher)
        sub = stage("student_kd")  # a from-scratch student takes the teacher's tokenizer
        grounder = distill(build_grounder(config.student, teacher.tokenizer, seed), teacher, sub, splits, config)
        _evaluate_into("student_kd", grounder, splits, config, sub, results)
        _free(grounder, teacher)
        seconds["student_kd"] = time.perf_counter() - clock
    for name, start in (("student_sft_rct", "student_sft"), ("student_kd_rct", "student_kd")):
        if name not in config.models:
            continue
        clock = time.perf_counter()
        log.info("%s: reflective correction training from %s", name, start)
        sub = stage(name)
        corrector = teacher_dir if config.rct.corrector == "teacher" else \
            (None if config.rct.corrector == "self" else Path(config.rct.corrector))
        initial = load_grounder(stage_dir[start] / "checkpoints", config.student)
        grounder, rct_rounds[name] = reflective_correction(initial, sub, splits, config, corrector)
        _evaluate_into(name, grounder, splits, config, sub, results)
        _free(grounder)
        seconds[name] = time.perf_counter() - clock
    return finish(run, config, splits, results, rct_rounds, seconds, started)


def _without_image_paths(result: dict[str, Any]) -> dict[str, Any]:
    """A model's results as metrics.json keeps them: examples named by case id, not by their image path
    (paths can hold patient identifiers; the gallery drew the images already)."""
    return {**result, "examples": [{k: v for k, v in e.items() if k != "image"} for e in result.get("examples", [])]}


def finish(run: RunDir, config: ClinKDConfig, splits: dict[str, list[Sample]], results: dict[str, dict[str, Any]],
           rct_rounds: dict[str, list[dict[str, Any]]], seconds: dict[str, float], started: float) -> dict[str, Any]:
    """metrics.json, the VG gallery and report.html of an experiment or a single stage."""
    notes = sorted({note for result in results.values() for task in CAPTION_TASKS
                    for note in result.get(task, {}).get("notes", [])})
    metrics = {"method": "clinkd", "stage": config.stage, "split": config.eval.split, "order": list(results),
               "models": {name: _without_image_paths(result) for name, result in results.items()},
               "summary": {name: headline(result) for name, result in results.items()},
               "baselines": baselines(splits["train"], splits[config.eval.split]), "rct": rct_rounds,
               "samples": {name: len(part) for name, part in splits.items()},
               "tasks": {name: {task: sum(s.task == task for s in part) for task in GROUNDING_TASKS}
                         for name, part in splits.items()},
               "caption_notes": notes, "seconds": {**seconds, "total": time.perf_counter() - started}}
    run.write_metrics(metrics)
    save_gallery(run.path / "gallery", results)
    from medistill.report.clinkd import write_clinkd_report

    write_clinkd_report(run.path)
    return metrics


def run_stage(config: ClinKDConfig, run: RunDir) -> dict[str, Any]:
    """One stage into `run` (its checkpoint in `run/checkpoints`), evaluated on the test split."""
    started = time.perf_counter()
    splits = load_samples(config)
    seed = config.train.seed
    results: dict[str, dict[str, Any]] = {}
    rounds: dict[str, list[dict[str, Any]]] = {}
    if config.stage == "sft":
        cfg = config.student if config.sft.model == "student" else config.teacher
        grounder = build_grounder(cfg, _tokenizer_for(cfg, splits, run.path / "tokenizer"), seed)
        grounder = train_grounder(grounder, run, splits["train"], splits["val"], config, epochs=config.sft.epochs,
                                  lr=config.sft.lr)
        name = "teacher" if config.sft.model == "teacher" else "student_sft"
    elif config.stage == "distill":
        assert config.distill.teacher is not None
        teacher = load_grounder(config.distill.teacher, config.teacher)
        student = build_grounder(config.student, teacher.tokenizer, seed)
        grounder, name = distill(student, teacher, run, splits, config), "student_kd"
        _free(teacher)
    elif config.stage == "rct":
        init = config.rct.init or config.student.pretrained
        assert init is not None
        corrector = {"self": None, "teacher": config.distill.teacher}.get(config.rct.corrector, config.rct.corrector)
        start = load_grounder(init, config.student)
        grounder, rounds["student_rct"] = reflective_correction(start, run, splits, config,
                                                                None if corrector is None else Path(corrector))
        name = "student_rct"
    else:
        assert config.eval.checkpoint is not None
        grounder, name = load_grounder(config.eval.checkpoint), "checkpoint"
    results[name] = evaluate_grounder(grounder, splits[config.eval.split], config)
    return finish(run, config, splits, results, rounds, {name: time.perf_counter() - started}, started)


@register_runner("clinkd")
def run_clinkd(config: ClinKDConfig, run: RunDir, resume: bool) -> dict[str, Any]:
    validate(config)
    return run_experiment(config, run) if config.stage == "experiment" else run_stage(config, run)


def evaluate_checkpoint(directory: str | Path, config: ClinKDConfig, split: str) -> dict[str, Any]:
    """`medistill eval` for a grounding checkpoint: BiRD's metrics and the baselines on a split of the recipe's data."""
    config = replace(config, eval=replace(config.eval, split=split))
    splits = load_samples(config)
    if not splits[split]:
        raise UsageError(f"the {split} split of {config.data.root} has no samples")
    result = evaluate_grounder(load_grounder(directory), splits[split], config)
    result.pop("examples")
    return {"split": split, **result, "baselines": baselines(splits["train"], splits[split])}

