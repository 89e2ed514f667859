"""`medistill predict`: one trained checkpoint directory, images in, what the model says about each.

Every checkpoint kind answers through the same interface:
- classifier (the image-only student of MMPKD or a plain classifier): each label's probability and the
  student's attention (rollout) as a heatmap over the image;
- vqa (AMiF): the answer to `question` with its score and the runners-up;
- grounding (ClinKD's Qwen2-VL, or any local Qwen2-VL directory): the answer text, and the boxes it names
  drawn on the image; `locate` asks "Please locate the {phrase} in the image."
Preprocessing, labels and vocabularies come from the checkpoint directory alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from medistill.data.imaging import IMAGE_SUFFIXES, load_image
from medistill.errors import UsageError

PICTURE_SIZE = 384  # pixels of the pictures predictions are drawn on
BOX_COLOURS = ((255, 64, 64), (64, 220, 64), (64, 160, 255), (255, 200, 0))


@dataclass
class Prediction:
    """What a model says about one image: `result` is JSON-ready; `grey` the image at PICTURE_SIZE and
    `overlay` an RGBA layer over it (attention colours or boxes; None for VQA), drawn at `opacity`."""

    image: str
    kind: str
    result: dict[str, Any]
    grey: np.ndarray | None = field(default=None, repr=False)
    overlay: np.ndarray | None = field(default=None, repr=False)
    opacity: float = 0.5

    @property
    def picture(self) -> np.ndarray | None:
        """The overlay blended onto the image as RGB (None without an overlay)."""
        if self.grey is None or self.overlay is None:
            return None
        alpha = self.overlay[..., 3:4].astype(np.float32) / 255.0 * self.opacity
        base = np.repeat(np.clip(self.grey, 0, 1)[..., None] * 255.0, 3, axis=2)
        return (base * (1 - alpha) + self.overlay[..., :3] * alpha).round().astype(np.uint8)

    def as_json(self) -> dict[str, Any]:
        return {"image": self.image, "kind": self.kind, **self.result}

    def summary(self) -> str:
        """One line for a person."""
        r = self.result
        if self.kind == "classifier":
            ranked = sorted(r["labels"].items(), key=lambda item: -item[1])
            return ", ".join(f"{name} {p:.2f}" for name, p in ranked)
        if self.kind == "vqa":
            others = ", ".join(f"{a['answer']} {a['probability']:.2f}" for a in r["alternatives"])
            return f"{r['answer']} ({r['probability']:.2f}; then {others})" if others else \
                f"{r['answer']} ({r['probability']:.2f})"
        boxes = f" [{len(r['boxes'])} box{'es' if len(r['boxes']) != 1 else ''}]" if r["boxes"] else ""
        return f"{r['answer']}{boxes}"


class Predictor(Protocol):
    kind: str

    def predict(self, image: Path, *, question: str | None = None, locate: str | None = None) -> Prediction:
        ...


def checkpoint_kind(directory: str | Path) -> str:
    """classifier, vqa or grounding, from the directory's config.json; clear errors for anything else."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory: pass a run's checkpoints/ folder")
    if not config_file.is_file():
        raise UsageError(f"{directory} has no config.json: pass a checkpoint directory (a run's checkpoints/)")
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UsageError(f"{config_file} is not valid JSON ({error})") from None
    if saved.get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        return "grounding"
    kind = saved.get("kind")
    if kind not in ("classifier", "vqa"):
        raise UsageError(f"{directory} holds a {kind!r} checkpoint; predict takes a classifier, VQA (AMiF) or "
                         "grounding (ClinKD) checkpoint")
    return str(kind)


def load_predictor(directory: str | Path) -> Predictor:
    kind = checkpoint_kind(directory)
    return {"classifier": ClassifierPredictor, "vqa": VQAPredictor, "grounding": GroundingPredictor}[kind](
        Path(directory))


def _grey_picture(image: Path) -> np.ndarray:
    return load_image(image, size=PICTURE_SIZE)


def _refuse(kind: str, flag: str, takes: str) -> None:
    raise UsageError(f"a {kind} checkpoint takes no {flag} ({takes}); --question is for VQA checkpoints, "
                     "--locate for grounding ones")


class ClassifierPredictor:
    kind = "classifier"

    def __init__(self, directory: Path) -> None:
        from medistill.engine.checkpoint import read_checkpoint
        from medistill.models.vit import vit_from_architecture

        weights, saved = read_checkpoint(directory)
        self.model = vit_from_architecture(saved["architecture"])
        self.model.load_state_dict(weights)
        self.model.eval()
        self.labels = list(saved["labels"])
        self.image_size = int(saved["preprocessing"]["image_size"])

    @torch.no_grad()
    def predict(self, image: Path, *, question: str | None = None, locate: str | None = None) -> Prediction:
        from medistill.data.datasets import normalise
        from medistill.explain.attention import attention_rollout, to_image
        from medistill.explain.overlay import colour_layer
        if question or locate:
            _refuse(self.kind, "--question" if question else "--locate", "it scores its labels on the image")
        pixels = torch.from_numpy(np.round(load_image(image, size=self.image_size) * 255).astype(np.uint8))
        out = self.model(normalise(pixels)[None, None], return_attentions=True)
        probabilities = torch.sigmoid(out["logits"][0].float()).tolist()
        attention = to_image(attention_rollout(out["attentions"]), PICTURE_SIZE)[0].numpy()
        labels = {name: round(p, 4) for name, p in zip(self.labels, probabilities)}
        return Prediction(str(image), self.kind, {"labels": labels, "attention": "rollout"},
                          _grey_picture(image), colour_layer(attention))


class VQAPredictor:
    kind = "vqa"

    def __init__(self, directory: Path, alternatives: int = 3) -> None:
        from medistill.methods.amif import AMiFConfig, load_vqa_checkpoint

        self.model, self.vocabulary, saved = load_vqa_checkpoint(directory)
        self.image_size = int(saved["preprocessing"]["image_size"])
        self.config = AMiFConfig()
        self.config.model.top_k = max(self.config.model.top_k, alternatives + 1)
        self.config.train.device = "cpu"
        self.alternatives = alternatives

    @torch.no_grad()
    def predict(self, image: Path, *, question: str | None = None, locate: str | None = None) -> Prediction:
        from medistill.data.records import Record
        from medistill.data.stores import ImageStore, TextStore
        from medistill.methods.amif import QuestionDataset, Stores, VQATask

        if locate:
            _refuse(self.kind, "--locate", "it answers a --question")
        if not question:
            raise UsageError("a VQA checkpoint answers a question: add --question TEXT")
        load_image(image)  # an undecodable file fails here, with its name
        record = Record(uid="question", image=str(image), split="test", question=question)
        stores = Stores(ImageStore([str(image)], self.image_size),
                        TextStore([question], self.model.text_encoder, encode=False))
        task = VQATask(self.model, {"test": QuestionDataset([record], stores, self.vocabulary)}, stores,
                       self.vocabulary, self.config)
        top, scores = task.rank("test")
        ranked = [{"answer": self.vocabulary.answers[i], "probability": round(math.exp(s), 4)}
                  for i, s in zip(top[0].tolist(), scores[0].tolist())]
        best = ranked[0]
        return Prediction(str(image), self.kind, {"question": question, "answer": best["answer"],
                                                  "probability": best["probability"],
                                                  "alternatives": ranked[1:1 + self.alternatives]},
                          _grey_picture(image))


class GroundingPredictor:
    kind = "grounding"

    def __init__(self, directory: Path, max_new_tokens: int = 100) -> None:
        from medistill.methods.clinkd import load_grounder

        self.grounder = load_grounder(directory)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def predict(self, image: Path, *, question: str | None = None, locate: str | None = None) -> Prediction:
        from medistill.data.formats.med_grit import modality_of
        from medistill.engine.trainer import resolve_device
        from medistill.methods.clinkd import Sample, generate
        from medistill.metrics.grounding import parse_boxes

        if question and locate:
            raise UsageError("give --question or --locate, not both")
        if not question and not locate:
            raise UsageError("a grounding checkpoint needs --locate PHRASE (or a free --question)")
        load_image(image)  # an undecodable file fails here, with its name
        prompt = question or f"Please locate the {locate} in the image."
        sample = Sample("question", str(image), prompt, "", "VG" if locate else "MIA",
                        modality_of(image.stem) or "unknown")
        answer = generate(self.grounder, [sample], budget=lambda _: self.max_new_tokens, batch_size=1,
                          device=resolve_device("cpu"), dtype=None)[0][0]
        boxes = [box for box in parse_boxes(answer) if box is not None]
        overlay = np.zeros((PICTURE_SIZE, PICTURE_SIZE, 4), dtype=np.uint8)
        for k, box in enumerate(boxes):
            _draw_grid_box(overlay, box, (*BOX_COLOURS[k % len(BOX_COLOURS)], 255))
        return Prediction(str(image), self.kind,
                          {"question": prompt, "answer": answer,
                           "boxes": [[box.x1, box.y1, box.x2, box.y2] for box in boxes], "box_grid": 1000},
                          _grey_picture(image), overlay, opacity=1.0)


def _draw_grid_box(rgb: np.ndarray, box: Any, colour: tuple[int, ...], width: int = 2) -> None:
    """Draw a box given on the 0-1000 grid onto an RGB(A) picture, in place."""
    height, breadth = rgb.shape[:2]
    x1, x2 = (int(np.clip(round(v / 1000 * breadth), 0, breadth - 1)) for v in (box.x1, box.x2))
    y1, y2 = (int(np.clip(round(v / 1000 * height), 0, height - 1)) for v in (box.y1, box.y2))
    rgb[y1:y1 + width, x1:x2 + 1] = colour
    rgb[max(0, y2 - width + 1):y2 + 1, x1:x2 + 1] = colour
    rgb[y1:y2 + 1, x1:x1 + width] = colour
    rgb[y1:y2 + 1, max(0, x2 - width + 1):x2 + 1] = colour


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Image files from the command line: files as given, folders by their image files (sorted), and list
    files (.txt / .lst: one path per line, relative to the list's folder; # comments)."""
    images: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"{item} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif item.suffix.lower() in (".txt", ".lst"):
            if not item.is_file():
                raise UsageError(f"list file {item} not found")
            lines = [line.strip() for line in item.read_text(encoding="utf-8").splitlines()]
            images += [(item.parent / line) for line in lines if line and not line.startswith("#")]
        else:
            images.append(item)
    return images
