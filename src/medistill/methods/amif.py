"""AMiF Med-VQA: aligned two-stage pretraining, hard-negative mining, optimal transport and gated fusion.

An experiment pretrains (stage 0: global image-text, multi-view image-image and text-text alignment with
the encoders training; stage 1: plus word-patch optimal transport and image-text matching on mined hard
negatives, encoders frozen), then fine-tunes a VQA model with Gated Cross-Attention over the training answer
vocabulary and answers by rank classification. Each variant (the full model, single-modality baselines and
one ablation per component) is a set of config overrides; pretraining runs are shared between variants
whose pretraining settings are equal. See docs/methods.md.

Leakage rules (tested): the answer vocabulary, the decoder's answer table, the GCA answer embeddings and
every training or pretraining batch come from training questions only; test questions and answers are
read for evaluation alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from medistill.config import (DataConfig, ModelConfig, OptimConfig, TrainConfig, apply_override, from_dict,
                              register_recipe, to_dict)
from medistill.data.datasets import held_out_by_key, normalise, preprocessing
from medistill.data.formats import open_dataset
from medistill.data.records import Record
from medistill.data.stores import ImageStore, TextStore, drop_tokens, random_views
from medistill.engine import distributed
from medistill.engine.distributed import main_only
from medistill.engine.checkpoint import read_checkpoint
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.engine.trainer import Trainer
from medistill.errors import UsageError
from medistill.losses.contrastive import soft_contrastive_loss
from medistill.losses.matching import itm_loss, sample_hard_negatives
from medistill.losses.ot import word_patch_ot_loss
from medistill.methods import register_runner
from medistill.methods.classifier import load_records
from medistill.metrics.vqa import vqa_accuracy
from medistill.models import create_model
from medistill.models.pretrained import load_pretrained_vit
from medistill.models.text import ScratchTextSpec, TextEncoder
from medistill.models.vqa.amif import AMiFModel, AMiFSpec
from medistill.models.vqa.layers import AnswerDecoder
from medistill.models.vqa.vocab import AnswerVocabulary

log = logging.getLogger(__name__)

ANSWERS_FILE = "answers.json"  # the answer vocabulary, beside a VQA checkpoint's config.json

# Each variant is the full recipe with these overrides (the report prints them).
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "question_only": ["model.use_image=false"],
    "image_only": ["model.use_question=false"],
    "no_soft_labels": ["pretrain.teacher=null"],
    "no_multiview": ["pretrain.multiview_weight=0"],
    "no_text_text": ["pretrain.text_text_weight=0"],
    "no_ot": ["pretrain.ot_weight=0"],
    "no_itm": ["pretrain.itm_weight=0"],
    "no_gca": ["model.gca=false"],
}


@dataclass
class SourceConfig:
    """A dataset read through a format reader. `text` says which field is the text of a pair:
    report (report-form sources, e.g. the phantom's mimic-cxr layout or `image-text` captions) or qa
    (the training questions of a VQA set with their answers; never its test split)."""

    format: str = "mimic-cxr"
    root: str = "runs/phantom/mimic-cxr"
    options: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    text: str = "report"  # report | qa | none (images only, for the multi-view loss)
    limit: int | None = None  # at most this many records (a seeded random subset)


@dataclass
class TextConfig:
    encoder: str = "minilm-l6"  # 'minilm-l6', a local BERT-family directory, or 'scratch'
    finetune: bool = False  # frozen: token features are computed once and cached
    max_length: int = 40
    scratch: ScratchTextSpec = field(default_factory=ScratchTextSpec)


@dataclass
class ImageConfig(ModelConfig):
    pretrained: str | None = None  # a local Hugging Face ViT or CLIP-vision directory


@dataclass
class FusionConfig:
    embed_dim: int = 128
    fusion_width: int = 192
    fusion_layers: int = 2
    fusion_heads: int = 4
    dropout: float = 0.1
    answer_head: str = "decoder"  # decoder (rank classification) | classifier
    decoder_layers: int = 2
    top_k: int = 8  # rank classification: candidates rescored by their sequence likelihood
    gca: bool = True
    use_image: bool = True
    use_question: bool = True


@dataclass
class StageConfig:
    epochs: int = 10
    lr: float = 3e-4


@dataclass
class PretrainConfig:
    pairs: list[SourceConfig] = field(default_factory=list)
    images: list[SourceConfig] = field(default_factory=list)  # unlabelled images for the multi-view loss
    teacher: str | None = "self"  # soft labels: 'self' (a stage-0 InfoNCE model), a checkpoint / HF CLIP dir, or null
    teacher_scale: float | None = None  # the teacher's similarity scale s; None: the teacher's own
    flexibility: float = 0.01  # lambda, added to the positive pair's soft-label logit
    smoothing: float = 0.1  # label smoothing of InfoNCE when there is no teacher
    multiview_weight: float = 1.0
    text_text_weight: float = 1.0
    ot_weight: float = 3.0
    ot_beta: float = 0.5
    ot_iterations: int = 50
    itm_weight: float = 1.0
    token_drop: float = 0.2  # the second text view when a pair has only one text
    batch_size: int = 32
    stage0: StageConfig = field(default_factory=StageConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(epochs=5))


@dataclass
class AMiFConfig:
    method: str = "amif"
    data: DataConfig = field(default_factory=lambda: DataConfig(format="vqa-rad", root="../shared/data/vqa_rad",
                                                               image_size=96))
    val_fraction: float = 0.1  # of training questions, when the dataset has no validation split
    max_train_questions: int | None = None  # seeded random subsets, for quick runs on large sets
    max_val_questions: int | None = None
    max_test_questions: int | None = None
    image: ImageConfig = field(default_factory=lambda: ImageConfig(name="vit-nano", patch_size=8, stem="conv"))
    text: TextConfig = field(default_factory=TextConfig)
    model: FusionConfig = field(default_factory=FusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0])
    examples: int = 12  # test questions shown in the report


register_recipe("amif", AMiFConfig)


def validate(config: AMiFConfig) -> None:
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not config.variants or not config.seeds:
        raise UsageError("variants and seeds must each name at least one entry")
    for source in config.pretrain.pairs + config.pretrain.images:
        if source.text not in ("report", "qa", "none"):
            raise UsageError(f"pretrain source text must be report, qa or none, not {source.text!r}")
    if config.text.finetune and config.text.encoder != "scratch" and config.train.device == "cpu":
        log.warning("text.finetune=true on a CPU is slow; the frozen encoder's features are cached otherwise")


def variant_config(config: AMiFConfig, variant: str) -> AMiFConfig:
    data = to_dict(config)
    for assignment in VARIANTS[variant]:
        apply_override(data, AMiFConfig, assignment)
    return from_dict(AMiFConfig, data)


# ----------------------------------------------------------------------------------------------
# data


def _subset(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    if limit is None or len(records) <= limit:
        return records
    generator = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(records), generator=generator)[:limit].tolist())
    return [records[i] for i in keep]


def vqa_splits(config: AMiFConfig) -> dict[str, list[Record]]:
    """Train / val / test questions. Without a validation split, `val_fraction` of the training questions
    is held out by a hash of the question's group: VQA-RAD's convention splits by question, not image, but a
    question and its paraphrase (same `qid_linked_id`) stay on one side, or validation would see the
    paraphrase's answer in training and overrate every epoch (on VQA-RAD it read ~10 points above test)."""
    records = [r for r in load_records(config.data) if r.question and r.answer is not None and r.image]
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if not val:
        held = {r.uid for r in train if held_out_by_key(r.meta.get("qid_linked_id") or r.uid, config.val_fraction)}
        val = [r for r in train if r.uid in held]
        train = [r for r in train if r.uid not in held]
    test = [r for r in records if r.split == "test"]
    if not train or not test:
        raise UsageError(f"{config.data.root}: the VQA data needs training and test questions "
                         f"(found {len(train)} train, {len(test)} test)")
    return {"train": _subset(train, config.max_train_questions, 0), "val": _subset(val, config.max_val_questions, 3),
            "test": _subset(test, config.max_test_questions, 1)}


def pair_records(config: AMiFConfig) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(image, text, second text or None) pretraining pairs and the unlabelled images for multi-view."""
    pairs: list[tuple[str, str, str | None]] = []
    for source in config.pretrain.pairs:
        records = [r for r in _source_records(source) if r.image]
        if source.text == "qa":
            records = [r for r in records if r.split == "train" and r.question]  # never a test question
            pairs += [(r.image, f"{r.question} {r.answer}", None) for r in records]  # type: ignore[misc]
        elif source.text == "report":
            pairs += [(r.image, _report_text(r), _second_text(r)) for r in records if r.report]  # type: ignore[misc]
    images = [r.image for source in config.pretrain.images for r in _source_records(source) if r.image]
    return pairs, list(dict.fromkeys(images))  # type: ignore[arg-type]


def _source_records(source: SourceConfig) -> list[Record]:
    reader = open_dataset(source.format, source.root, **source.options)
    records = [r for r in reader.records() if source.modality is None or r.modality == source.modality]
    if not records:
        raise UsageError(f"no records in {source.root} (format {source.format}): check pretrain sources")
    return _subset(records, source.limit, 2)


def _report_text(record: Record) -> str:
    """The findings and impression of a report when it has those sections, else the whole text."""
    parts = [record.meta.get("findings"), record.meta.get("impression")]
    return " ".join(p for p in parts if p) or str(record.report)


def _second_text(record: Record) -> str | None:
    """A second view of the same report for the text-text loss: the impression, when there are both sections."""
    findings, impression = record.meta.get("findings"), record.meta.get("impression")
    return impression if findings and impression else None


@dataclass
class Stores:
    images: ImageStore
    texts: TextStore


class PairDataset(Dataset):
    """Pretraining samples as store rows: image, text, second text (-1: none), the study's other view (the
    image itself when it has none), and one unlabelled image (cycled, so every batch has the same
    composition; -1 when there are none)."""

    def __init__(self, pairs: list[dict[str, Any]], extra_images: list[int]) -> None:
        self.pairs = pairs
        self.extra = extra_images

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        extra = self.extra[index % len(self.extra)] if self.extra else -1
        return {**self.pairs[index], "extra_row": extra}


class QuestionDataset(Dataset):
    def __init__(self, records: list[Record], stores: Stores, vocabulary: AnswerVocabulary) -> None:
        self.records = records
        self.items = [{"uid": r.uid, "image_row": stores.images.index(r.image),
                       "text_row": stores.texts.index(r.question),
                       "target": t if (t := vocabulary.target(r)) is not None else -1, "position": i}
                      for i, r in enumerate(records)]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def gather_batch(stores: Stores, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate index items into tensors: images as uint8, texts tokenised (and encoded when cached)."""
    columns = {key: torch.tensor([item[key] for item in items]) for key in items[0] if key != "uid"}
    batch: dict[str, Any] = dict(columns)
    batch["uid"] = [item.get("uid", "?") for item in items]  # named when a loss turns non-finite
    batch["image"] = stores.images.images[columns["image_row"]]
    batch.update(stores.texts.batch(columns["text_row"], "text"))
    if "second_row" in columns:
        second = torch.where(columns["second_row"] >= 0, columns["second_row"], columns["text_row"])
        batch.update(stores.texts.batch(second, "second"))
        batch["view_image"] = stores.images.images[columns["view_row"]]
    if "extra_row" in columns and bool((columns["extra_row"] >= 0).all()):
        batch["extra_image"] = stores.images.images[columns["extra_row"]]
    return batch


# ----------------------------------------------------------------------------------------------
# the model


def build_model(config: AMiFConfig, vocabulary: AnswerVocabulary | None, seed: int) -> AMiFModel:
    """An AMiF model; with a vocabulary, its answer tables (decoder sequences, GCA words) are filled in."""
    torch.manual_seed(seed)
    image_cfg = config.image
    if image_cfg.pretrained:
        vit = load_pretrained_vit(image_cfg.pretrained, num_classes=1, image_size=config.data.image_size,
                                  dropout=image_cfg.dropout)
    else:
        vit = create_model(image_cfg.name, image_size=config.data.image_size, patch_size=image_cfg.patch_size,
                           num_classes=1, dropout=image_cfg.dropout, stem=image_cfg.stem,
                           stem_width=image_cfg.stem_width, stem_convs=image_cfg.stem_convs)
    scratch = config.text.scratch if config.text.encoder == "scratch" else None
    text = TextEncoder(config.text.encoder, max_length=config.text.max_length, scratch=scratch)
    m = config.model
    tables = answer_tables(vocabulary, text) if vocabulary is not None else None
    spec = AMiFSpec(
        image=vit.architecture(), text_encoder=config.text.encoder,
        text_scratch=to_dict(config.text.scratch) if scratch else {}, text_max_length=config.text.max_length,
        embed_dim=m.embed_dim, fusion_width=m.fusion_width, fusion_layers=m.fusion_layers,
        fusion_heads=m.fusion_heads, dropout=m.dropout, answer_head=m.answer_head, decoder_layers=m.decoder_layers,
        gca=m.gca, use_image=m.use_image, use_question=m.use_question,
        **({} if tables is None else tables["sizes"]))
    model = AMiFModel(spec, image_encoder=vit, text_encoder=text)  # type: ignore[arg-type]
    if tables is not None:
        for name in ("answer_sequences", "answer_words", "answer_word_mask"):
            getattr(model, name).copy_(tables[name])
    if not config.text.finetune:
        model.text_encoder.requires_grad_(False)
    return model


def answer_tables(vocabulary: AnswerVocabulary, text: TextEncoder, max_tokens: int = 8) -> dict[str, Any]:
    """The decoder's answer sequences over a compact token set (tokens of training answers only) and the
    answers' word ids for GCA, both from the training vocabulary."""
    tokenised = [text.tokenizer(answer, add_special_tokens=False)["input_ids"][: max_tokens - 1] or
                 [text.tokenizer.unk_token_id] for answer in vocabulary.answers]
    compact = {token: AnswerDecoder.EOS + 1 + i
               for i, token in enumerate(dict.fromkeys(t for row in tokenised for t in row))}
    length = max(len(row) for row in tokenised) + 1
    sequences = torch.zeros(len(tokenised), length, dtype=torch.long)
    words = torch.zeros(len(tokenised), length - 1, dtype=torch.long)
    for i, row in enumerate(tokenised):
        sequences[i, : len(row) + 1] = torch.tensor([compact[t] for t in row] + [AnswerDecoder.EOS])
        words[i, : len(row)] = torch.tensor(row)
    return {"answer_sequences": sequences, "answer_words": words, "answer_word_mask": _word_mask(tokenised, length - 1),
            "sizes": {"answers": len(tokenised), "decoder_vocab": len(compact) + AnswerDecoder.EOS + 1,
                      "answer_length": length, "answer_word_length": length - 1}}


def _word_mask(tokenised: list[list[int]], length: int) -> torch.Tensor:
    mask = torch.zeros(len(tokenised), length, dtype=torch.long)
    for i, row in enumerate(tokenised):
        mask[i, : len(row)] = 1
    return mask


# ----------------------------------------------------------------------------------------------
# soft-label teachers


@dataclass
class TeacherEmbeddings:
    """A frozen CLIP-like teacher's embeddings of every stored image and text, and its similarity scale."""

    images: torch.Tensor
    texts: torch.Tensor
    scale: float


@torch.no_grad()
def embed_with_amif(model: AMiFModel, stores: Stores, batch_size: int = 128) -> TeacherEmbeddings:
    """Embeddings from an AMiF model (e.g. the stage-0 InfoNCE model, or a checkpoint of an earlier run)."""
    model.eval()
    size = model.image_encoder.spec.image_size
    images = []
    for start in range(0, len(stores.images), batch_size):
        pixels = normalise(stores.images.images[start:start + batch_size]).unsqueeze(1)
        if pixels.shape[-1] != size:
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        images.append(model.image_embedding(model.image_tokens(pixels)).float())
    texts = []
    for start in range(0, len(stores.texts), batch_size):
        batch = model.text_encoder.tokenize(stores.texts.texts[start:start + batch_size])
        tokens = model.text_encoder(batch["input_ids"], batch["attention_mask"])["tokens"]
        texts.append(model.text_embedding(tokens, batch["attention_mask"]).float())
    return TeacherEmbeddings(torch.cat(images), torch.cat(texts), float(1.0 / model.temperature("image_text")))


@torch.no_grad()
def embed_with_clip(directory: Path, stores: Stores, batch_size: int = 64) -> TeacherEmbeddings:
    """Embeddings from a local Hugging Face CLIP directory (grey images repeated to its channels)."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(str(directory), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    processor = directory / "preprocessor_config.json"
    settings = json.loads(processor.read_text()) if processor.is_file() else {}
    mean = torch.tensor(settings.get("image_mean", [0.48145466, 0.4578275, 0.40821073])).view(1, 3, 1, 1)
    std = torch.tensor(settings.get("image_std", [0.26862954, 0.26130258, 0.27577711])).view(1, 3, 1, 1)
    size = clip.config.vision_config.image_size
    images = []
    for start in range(0, len(stores.images), batch_size):
        pixels = stores.images.images[start:start + batch_size].float().div(255).unsqueeze(1)
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
        images.append(clip.get_image_features(pixel_values=(pixels.expand(-1, 3, -1, -1) - mean) / std).float())
    texts = []
    limit = clip.config.text_config.max_position_embeddings
    for start in range(0, len(stores.texts), batch_size):
        batch = tokenizer(stores.texts.texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=limit, return_tensors="pt")
        texts.append(clip.get_text_features(**batch).float())
    return TeacherEmbeddings(torch.cat(images), torch.cat(texts), float(clip.logit_scale.exp()))


def load_teacher(source: str, stores: Stores) -> TeacherEmbeddings:
    """A teacher from a medistill AMiF checkpoint directory or a local Hugging Face CLIP directory."""
    directory = Path(source)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UsageError(f"pretrain.teacher {source!r} is neither 'self' nor a directory with a config.json")
    config = json.loads(config_file.read_text())
    if config.get("architecture", {}).get("name") == "amif":
        from medistill.models.vqa.amif import amif_from_architecture

        model = amif_from_architecture(config["architecture"])
        model.load_state_dict(read_checkpoint(directory)[0])
        return embed_with_amif(model, stores)
    if config.get("model_type") == "clip":
        return embed_with_clip(directory, stores)
    raise UsageError(f"pretrain.teacher {source}: expected a medistill AMiF checkpoint or a Hugging Face CLIP "
                     f"directory (config.json model_type 'clip'), found model_type {config.get('model_type')!r}")


# ----------------------------------------------------------------------------------------------
# pretraining


def word_mask(mask: torch.Tensor) -> torch.Tensor:
    """The attention mask without the first token (CLS) and the last real one (SEP)."""
    words = mask.clone()
    words[:, 0] = 0
    words.scatter_(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0), 0)
    return words


class PretrainTask:
    """Stage 0: global image-text + multi-view image-image + text-text alignment. Stage 1 adds word-patch OT
    and image-text matching on hard negatives; the encoders are frozen then."""

    def __init__(self, model: AMiFModel, stage: int, config: PretrainConfig, stores: Stores,
                 teacher: TeacherEmbeddings | None, val: PairDataset) -> None:
        self.model = model
        self.stage = stage
        self.cfg = config
        self.stores = stores
        self.teacher = teacher
        self.val = val

    def _teacher(self, rows_a: torch.Tensor, rows_b: torch.Tensor,
                 kinds: str = "image_text") -> tuple[torch.Tensor, torch.Tensor] | None:
        """Teacher embeddings of two row sets; `kinds` names the tables: image_text, image or text."""
        if self.teacher is None:
            return None
        if self.teacher.images.device != rows_a.device:  # moved once, not on every step
            self.teacher.images, self.teacher.texts = self.teacher.images.to(rows_a.device), \
                self.teacher.texts.to(rows_a.device)
        tables = {"image": self.teacher.images, "text": self.teacher.texts}
        first, second = ("image", "text") if kinds == "image_text" else (kinds, kinds)
        return tables[first][rows_a], tables[second][rows_b]

    def _contrastive(self, a: torch.Tensor, b: torch.Tensor, temperature: str,
                     teacher: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        c = self.cfg
        return soft_contrastive_loss(a, b, self.model.temperature(temperature), teacher=teacher,
                                     teacher_scale=self.teacher.scale if self.teacher and c.teacher_scale is None
                                     else (c.teacher_scale or 100.0),
                                     flexibility=c.flexibility, smoothing=c.smoothing)

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        m, c = self.model, self.cfg
        image_tokens = m.image_tokens(random_views(batch["image"]))
        text, mask = m.text_tokens(batch, "text")
        v, t = m.image_embedding(image_tokens), m.text_embedding(text, mask)
        image_rows, text_rows = batch["image_row"], batch["text_row"]
        terms = {"image_text": self._contrastive(v, t, "image_text", self._teacher(image_rows, text_rows))}
        if c.multiview_weight > 0:
            terms["multiview"] = c.multiview_weight * self._multiview(batch, v)
        if c.text_text_weight > 0:
            second, second_mask = m.text_tokens(batch, "second")
            has_second = batch["second_row"] >= 0
            second_mask = torch.where(has_second[:, None], second_mask, drop_tokens(second_mask, c.token_drop))
            t2 = m.text_embedding(second, second_mask)
            rows2 = torch.where(has_second, batch["second_row"], text_rows)
            terms["text_text"] = c.text_text_weight * self._contrastive(t, t2, "text_text",
                                                                        self._teacher(text_rows, rows2, "text"))
        if self.stage == 1:
            terms.update(self._fusion_terms(image_tokens, text, mask, v, t))
        return terms

    def _multiview(self, batch: dict[str, Any], first_view: torch.Tensor) -> torch.Tensor:
        """Two views of every image of the batch (pairs and unlabelled images). A pair's first view is the
        augmented image the image-text loss already embedded (`first_view`); its second is the study's other
        view when it has one, else another augmentation."""
        m = self.model
        a, b = first_view, m.image_embedding(m.image_tokens(random_views(batch["view_image"])))
        rows = batch["image_row"]
        if "extra_image" in batch:
            extra = batch["extra_image"]
            a = torch.cat([a, m.image_embedding(m.image_tokens(random_views(extra)))])
            b = torch.cat([b, m.image_embedding(m.image_tokens(random_views(extra)))])
            rows = torch.cat([rows, batch["extra_row"]])
        return self._contrastive(a, b, "image_image", self._teacher(rows, rows, "image"))

    def _fusion_terms(self, image_tokens: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, v: torch.Tensor,
                      t: torch.Tensor) -> dict[str, torch.Tensor]:
        m, c = self.model, self.cfg
        terms: dict[str, torch.Tensor] = {}
        fused_text, fused_image = m.fuse(text, mask, image_tokens)
        if c.ot_weight > 0:  # words only (no CLS / SEP, as in UNITER / ViLT) against patches (no CLS)
            terms["ot"] = c.ot_weight * word_patch_ot_loss(
                fused_text.float(), word_mask(mask), fused_image[:, 1:].float(), None,
                beta=c.ot_beta, iterations=c.ot_iterations).mean()
        if c.itm_weight > 0:
            similarity = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
            negatives = sample_hard_negatives(similarity / m.temperature("image_text"))
            neg_text, neg_image = m.fuse(text[negatives], mask[negatives], image_tokens)
            logits = torch.cat([m.itm_logits(fused_text, fused_image), m.itm_logits(neg_text, neg_image)])
            matched = torch.cat([torch.ones(len(v)), torch.zeros(len(v))]).to(logits.device)
            terms["itm"] = c.itm_weight * itm_loss(logits, matched)
        return terms

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Image-to-text recall@1 among the held-out pairs (a sanity signal for pretraining)."""
        if len(self.val) < 2:
            return {}
        m = self.model
        batch = gather_batch(self.stores, [self.val[i] for i in range(min(len(self.val), 512))])
        device = next(m.parameters()).device
        v = m.image_embedding(m.image_tokens(normalise(batch["image"]).unsqueeze(1).to(device)))
        text, mask = m.text_tokens({k: x.to(device) for k, x in batch.items() if isinstance(x, torch.Tensor)})
        t = m.text_embedding(text, mask)
        hits = (v @ t.T).argmax(1).cpu() == torch.arange(len(v))
        return {"recall@1": float(hits.float().mean())}

    def checkpoint_module(self) -> AMiFModel:
        return self.model

    def checkpoint_config(self) -> dict[str, Any]:
        return {"kind": "amif-pretrained", "stage": self.stage, "architecture": self.model.architecture(),
                "preprocessing": preprocessing(self.model.image_encoder.spec.image_size), "method": "amif"}


def stage_key(config: AMiFConfig, stage: int) -> str:
    """A hash of everything a pretraining stage depends on, so that variants with equal settings share it."""
    p = to_dict(config.pretrain)
    if stage == 0:
        for name in ("ot_weight", "ot_beta", "ot_iterations", "itm_weight", "stage1"):
            p.pop(name)
    m = to_dict(config.model)
    relevant = {"stage": stage, "pretrain": p, "image": to_dict(config.image), "text": to_dict(config.text),
                "image_size": config.data.image_size, "seed": config.train.seed,
                "fusion": {k: m[k] for k in ("embed_dim", "fusion_width", "fusion_layers", "fusion_heads", "dropout")}}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class PretrainData:
    train: PairDataset
    val: PairDataset


def pretrain_data(pairs: list[tuple[str, str, str | None]], extra: list[str], stores: Stores,
                  studies: dict[str, list[str]]) -> PretrainData:
    """Pairs as store rows, split 90 / 10 by image for the held-out retrieval check."""
    rows = []
    for image, text, second in pairs:
        others = [p for p in studies.get(image, []) if p != image]
        rows.append({"uid": Path(image).name, "image_row": stores.images.index(image),
                     "text_row": stores.texts.index(text),
                     "second_row": stores.texts.index(second) if second else -1,
                     "view_row": stores.images.index(others[0]) if others else stores.images.index(image)})
    held = [held_out_by_key(image, 0.1) for image, _, _ in pairs]
    extra_rows = [stores.images.index(path) for path in extra]
    return PretrainData(PairDataset([r for r, h in zip(rows, held) if not h], extra_rows),
                        PairDataset([r for r, h in zip(rows, held) if h], []))


def resolve_teacher(config: AMiFConfig, stores: Stores, data: PretrainData, run: RunDir, seed: int,
                    cache: dict[str, AMiFModel]) -> TeacherEmbeddings | None:
    """The soft-label teacher, the same for every variant: 'self' is the recipe's own stage-0 model trained
    with label-smoothed InfoNCE (the no_soft_labels variant's stage 0), else a checkpoint or CLIP directory."""
    source = config.pretrain.teacher
    if not config.pretrain.pairs or not source:
        return None
    if source == "self":
        return embed_with_amif(_stage(variant_config(config, "no_soft_labels"), 0, stores, data, run, seed, None,
                                      cache), stores)
    return load_teacher(source, stores)


def pretrain(config: AMiFConfig, stores: Stores, data: PretrainData, run: RunDir, seed: int,
             teacher: TeacherEmbeddings | None, cache: dict[str, AMiFModel]) -> AMiFModel | None:
    """Stage 0 then stage 1 (each resumable, shared between variants by `stage_key`); None without pairs."""
    if not config.pretrain.pairs:
        return None
    teacher = teacher if config.pretrain.teacher else None
    model = _stage(config, 0, stores, data, run, seed, teacher, cache)
    return _stage(config, 1, stores, data, run, seed, teacher, cache, start=model)


def _stage(config: AMiFConfig, stage: int, stores: Stores, data: PretrainData, run: RunDir, seed: int,
           teacher: TeacherEmbeddings | None, cache: dict[str, AMiFModel], start: AMiFModel | None = None) -> AMiFModel:
    key = stage_key(config, stage)
    if key in cache:
        return cache[key]
    settings = config.pretrain.stage0 if stage == 0 else config.pretrain.stage1
    # GCA takes no part in pretraining, and variants share stages by their key: every variant pretrains the
    # same architecture (GCA included), so no_gca resumes and continues the full model's stages
    model = build_model(replace(config, model=replace(config.model, gca=True)), None, seed)
    if start is not None:
        model.load_state_dict(distributed.full_state_dict(start, every_rank=True))
    if stage == 1:  # encoders frozen; fusion, heads, projections and temperatures train
        model.image_encoder.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
    directory = RunDir(prepare_output_dir(run.path / "pretrain" / f"stage{stage}-{key}", resume=True))
    log.info("pretraining stage %d (%s) on %d pairs, %d unlabelled images", stage, key, len(data.train),
             len(data.train.extra))
    task = PretrainTask(model, stage, config.pretrain, stores, teacher, data.val)
    train = TrainConfig(**{**vars(config.train), "epochs": settings.epochs, "batch_size": config.pretrain.batch_size,
                           "seed": seed, "early_stopping": type(config.train.early_stopping)()})
    optim = OptimConfig(**{**vars(config.optim), "lr": settings.lr})
    trainer = Trainer(task, data.train, train, optim, directory, collate=lambda items: gather_batch(stores, items),
                      drop_last=True)
    trainer.fit(resume=directory.train_state.exists())
    model.requires_grad_(True)
    cache[key] = model
    return model


# ----------------------------------------------------------------------------------------------
# fine-tuning and answering


class VQATask:
    def __init__(self, model: AMiFModel, datasets: dict[str, QuestionDataset], stores: Stores,
                 vocabulary: AnswerVocabulary, config: AMiFConfig) -> None:
        self.model = model
        self.datasets = datasets
        self.stores = stores
        self.vocabulary = vocabulary
        self.config = config

    def memory(self, batch: dict[str, Any], augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        text = mask = None
        if m.spec.use_question:
            text, mask = m.text_tokens(batch, "text")
        image = None
        if m.spec.use_image:
            pixels = random_views(batch["image"], scale=(0.8, 1.0), degrees=5.0) if augment else \
                normalise(batch["image"]).unsqueeze(1)
            image = m.image_tokens(pixels)
        fused_text, fused_image = m.fuse(text, mask, image)
        return m.answer_memory(fused_text, mask, fused_image)

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        memory, mask = self.memory(batch, augment=True)
        return {"answer": self.model.answer_loss(memory, mask, batch["target"])}

    @torch.no_grad()
    def rank(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k answer indices and scores for every question of a split, in order."""
        dataset = self.datasets[split]
        device = next(self.model.parameters()).device
        indices, scores = [], []
        size = self.config.train.eval_batch_size
        for start in range(0, len(dataset), size):
            items = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in gather_batch(self.stores, items).items()}
            memory, mask = self.memory(batch, augment=False)
            top, score = self.model.rank_answers(memory, mask, self.config.model.top_k)
            indices.append(top.cpu())
            scores.append(score.cpu())
        return torch.cat(indices), torch.cat(scores)

    def evaluate(self, split: str) -> dict[str, float]:
        top, _ = self.rank(split)
        result = vqa_accuracy([self.vocabulary.answers[i] for i in top[:, 0].tolist()], self.datasets[split].records)
        return {"accuracy": result["overall"]["accuracy"], "open": result["open"]["accuracy"] or 0.0,
                "closed": result["closed"]["accuracy"] or 0.0}

    def checkpoint_module(self) -> AMiFModel:
        return self.model

    def checkpoint_config(self) -> dict[str, Any]:
        return {"kind": "vqa", "method": "amif", "architecture": self.model.architecture(),
                "preprocessing": preprocessing(self.config.data.image_size),
                "answers": list(self.vocabulary.answers), "answers_fingerprint": self.vocabulary.fingerprint}


def finetune(config: AMiFConfig, stores: Stores, splits: dict[str, list[Record]], vocabulary: AnswerVocabulary,
             pretrained: AMiFModel | None, seed: int, run_dir: Path) -> tuple[VQATask, dict[str, Any]]:
    """Fine-tune on the training questions (early stopping on validation accuracy) and evaluate on test."""
    model = build_model(config, vocabulary, seed)
    if pretrained is not None:
        own = model.state_dict()
        shared = {k: v for k, v in distributed.full_state_dict(pretrained, every_rank=True).items()
                  if k in own and own[k].shape == v.shape and not k.startswith("answer_")}
        model.load_state_dict(shared, strict=False)
    datasets = {name: QuestionDataset(records, stores, vocabulary) for name, records in splits.items()}
    task = VQATask(model, datasets, stores, vocabulary, config)
    train = TrainConfig(**{**vars(config.train), "seed": seed})
    run = RunDir(prepare_output_dir(run_dir, resume=True))
    trainer = Trainer(task, datasets["train"], train, config.optim, run,
                      collate=lambda items: gather_batch(stores, items))
    trainer.fit(resume=run.train_state.exists())
    vocabulary.save(run.checkpoint_dir / ANSWERS_FILE)
    top, scores = task.rank("test")
    predictions = [vocabulary.answers[i] for i in top[:, 0].tolist()]
    return task, {"accuracy": vqa_accuracy(predictions, splits["test"]), "top": top, "scores": scores}


def load_vqa_checkpoint(directory: str | Path) -> tuple[AMiFModel, AnswerVocabulary, dict[str, Any]]:
    """A fine-tuned AMiF model with its answer vocabulary, checked against the checkpoint's fingerprint."""
    from medistill.models.vqa.amif import amif_from_architecture

    directory = Path(directory)
    weights, saved = read_checkpoint(directory)
    if saved.get("kind") != "vqa":
        raise UsageError(f"{directory} holds a {saved.get('kind')!r} checkpoint, not a VQA model")
    answers_file = directory / ANSWERS_FILE
    if not answers_file.is_file():
        raise UsageError(f"{directory} has no {ANSWERS_FILE}: copy the whole checkpoint directory")
    vocabulary = AnswerVocabulary.load(answers_file)
    vocabulary.check_matches(saved["answers_fingerprint"])
    model = amif_from_architecture(saved["architecture"])
    model.load_state_dict(weights)
    return model.eval(), vocabulary, saved


def evaluate_vqa_checkpoint(directory: str | Path, config: AMiFConfig, split: str) -> dict[str, Any]:
    """`medistill eval` for a VQA checkpoint: the accuracy tables on a split of the recipe's data."""
    model, vocabulary, saved = load_vqa_checkpoint(directory)
    config.data.image_size = saved["preprocessing"]["image_size"]
    records = vqa_splits(config)[split]
    if not records:
        raise UsageError(f"the {split} split of {config.data.root} has no questions")
    stores = Stores(ImageStore([r.image for r in records], config.data.image_size),  # type: ignore[misc]
                    TextStore([r.question for r in records], model.text_encoder, encode=False))  # type: ignore[misc]
    task = VQATask(model, {split: QuestionDataset(records, stores, vocabulary)}, stores, vocabulary, config)
    top, _ = task.rank(split)
    return {"split": split, "questions": len(records),
            **vqa_accuracy([vocabulary.answers[i] for i in top[:, 0].tolist()], records)}


def build_stores(config: AMiFConfig, splits: dict[str, list[Record]], pairs: list[tuple[str, str, str | None]],
                 extra: list[str]) -> Stores:
    images = [r.image for part in splits.values() for r in part] + [p[0] for p in pairs] + extra
    texts = [r.question for part in splits.values() for r in part] + [p[1] for p in pairs] + \
            [p[2] for p in pairs if p[2]]
    scratch = config.text.scratch if config.text.encoder == "scratch" else None
    encoder = TextEncoder(config.text.encoder, max_length=config.text.max_length, scratch=scratch)
    encode = not config.text.finetune and config.text.encoder != "scratch"
    if config.text.encoder == "scratch" and not config.text.finetune:
        raise UsageError("text.encoder=scratch needs text.finetune=true (a random encoder must train)")
    log.info("decoding %d images at %d px and tokenising %d texts", len(set(images)), config.data.image_size,
             len(set(texts)))
    return Stores(ImageStore(images, config.data.image_size),  # type: ignore[arg-type]
                  TextStore(texts, encoder, encode=encode, progress=config.train.progress))  # type: ignore[arg-type]


def _studies(config: AMiFConfig) -> dict[str, list[str]]:
    """Image -> the images of its study, for sources whose studies have several views."""
    groups: dict[str, list[str]] = {}
    for source in config.pretrain.pairs:
        for record in _source_records(source):
            if record.study_id and record.image:
                groups.setdefault(f"{source.root}/{record.study_id}", []).append(record.image)
    return {image: members for members in groups.values() if len(members) > 1 for image in members}


@register_runner("amif")
def run_amif(config: AMiFConfig, run: RunDir, resume: bool) -> dict[str, Any]:
    validate(config)
    started = time.perf_counter()
    splits = vqa_splits(config)
    vocabulary = AnswerVocabulary.from_records(splits["train"])
    vocabulary.save(run.path / "answers.json")
    pairs, extra = pair_records(config)
    stores = build_stores(config, splits, pairs, extra)
    data = pretrain_data(pairs, extra, stores, _studies(config))
    results: dict[str, list[dict[str, Any]]] = {}
    examples: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for seed in config.seeds:
        cache: dict[str, AMiFModel] = {}
        base = variant_config(config, "full")
        base.train.seed = seed
        teacher = resolve_teacher(base, stores, data, run, seed, cache)
        for variant in config.variants:
            variant_started = time.perf_counter()
            vc = variant_config(config, variant)
            vc.train.seed = seed
            log.info("seed %d: variant %s", seed, variant)
            pretrained = pretrain(vc, stores, data, run, seed, teacher, cache)
            task, outcome = finetune(vc, stores, splits, vocabulary, pretrained, seed,
                                     run.path / f"seed{seed}" / variant)
            results.setdefault(variant, []).append({"seed": seed, **outcome["accuracy"]})
            seconds[variant] = seconds.get(variant, 0.0) + time.perf_counter() - variant_started
            overall = outcome["accuracy"]["overall"]["accuracy"]
            run.log.write("variant", seed=seed, variant=variant, accuracy=overall)
            if variant == config.variants[0] and seed == config.seeds[0]:
                examples = _examples(splits["test"], vocabulary, outcome, config.examples)
    metrics = summarise(results, vocabulary, splits, seconds)
    metrics["examples"] = examples
    metrics["seconds"] = time.perf_counter() - started
    run.write_metrics(metrics)
    _save_examples(run.path / "examples", examples, stores, splits["test"])
    from medistill.report.amif import write_amif_report

    write_amif_report(run.path)
    return metrics


@main_only
def _save_examples(directory: Path, examples: dict[str, Any], stores: Stores, test: list[Record]) -> None:
    from medistill.explain.overlay import png_bytes, to_rgb

    directory.mkdir(parents=True, exist_ok=True)
    scale = max(1, 192 // stores.images.image_size)
    for row in examples.get("rows", []):
        grey = stores.images.images[stores.images.index(test[row["index"]].image)].float().numpy() / 255.0
        (directory / f"{row['index']:05d}.png").write_bytes(png_bytes(to_rgb(grey), scale))


def summarise(results: dict[str, list[dict[str, Any]]], vocabulary: AnswerVocabulary,
              splits: dict[str, list[Record]], seconds: dict[str, float]) -> dict[str, Any]:
    """Per variant: the accuracy tables of each seed and the mean (with 95% t-interval over seeds)."""
    from medistill.metrics.summary import mean_ci

    variants = {}
    for variant, runs in results.items():
        summary = {}
        for group in ("overall", "open", "closed"):
            summary[group] = mean_ci([r[group]["accuracy"] for r in runs])
            summary[f"yes_no_{group}"] = mean_ci([r["yes_no_convention"][group]["accuracy"] for r in runs])
        variants[variant] = {"summary": summary, "seeds": runs, "overrides": VARIANTS[variant],
                             "seconds": seconds.get(variant)}
    return {"method": "amif", "variants": variants, "answers": len(vocabulary),
            "answers_fingerprint": vocabulary.fingerprint,
            "out_of_vocabulary": vocabulary.out_of_vocabulary(splits["test"]),
            "questions": {name: len(part) for name, part in splits.items()}}


def _examples(test: list[Record], vocabulary: AnswerVocabulary, outcome: dict[str, Any], count: int) -> dict[str, Any]:
    """The first `count` test questions of each answer type with the model's top answers."""
    chosen = [i for kind in ("CLOSED", "OPEN") for i in [j for j, r in enumerate(test) if r.answer_type == kind][: count // 2]]
    rows = []
    for i in chosen:
        record = test[i]
        top = [(vocabulary.answers[a], float(s)) for a, s in zip(outcome["top"][i].tolist(), outcome["scores"][i].tolist())]
        rows.append({"index": i, "question": record.question, "answer": record.answer, "answer_type": record.answer_type,
                     "predicted": top[0][0], "alternatives": top[1:4]})
    return {"rows": rows}
