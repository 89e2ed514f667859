"""`medistill eval`: metrics of a saved checkpoint on a split of a recipe's data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medistill.config import ClassifierConfig, load_config
from medistill.engine.checkpoint import read_checkpoint
from medistill.errors import UsageError
from medistill.metrics.classification import multilabel_metrics


def _is_grounding_checkpoint(checkpoint: Path) -> bool:
    """A Hugging Face Qwen2-VL / Qwen2.5-VL directory (ClinKD's checkpoints, or a real one)."""
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("model_type") in ("qwen2_vl", "qwen2_5_vl")


def evaluate_checkpoint(checkpoint: Path, recipe: Path, overrides: list[str], *, split: str) -> dict[str, Any]:
    from medistill.methods.classifier import build_datasets, predict
    from medistill.models.vit import vit_from_architecture

    if _is_grounding_checkpoint(checkpoint):
        from medistill.methods.clinkd import ClinKDConfig, evaluate_checkpoint

        config = load_config(recipe, overrides)
        if not isinstance(config, ClinKDConfig):
            raise UsageError(f"{checkpoint} is a grounding (Qwen2-VL) checkpoint: pass a clinkd recipe "
                             "(e.g. configs/clinkd/phantom-tiny.yaml or the run's config.yaml)")
        return evaluate_checkpoint(checkpoint, config, split)
    weights, saved = read_checkpoint(checkpoint)
    config = load_config(recipe, overrides)
    if saved.get("kind") == "vqa":
        from medistill.methods.amif import AMiFConfig, evaluate_vqa_checkpoint

        if not isinstance(config, AMiFConfig):
            raise UsageError(f"{checkpoint} is a VQA checkpoint: pass its amif recipe (e.g. the run's config.yaml)")
        return evaluate_vqa_checkpoint(checkpoint, config, split)
    if saved.get("kind") != "classifier" or not isinstance(config, ClassifierConfig):
        raise UsageError(f"eval handles classifier and VQA checkpoints; {checkpoint} is {saved.get('kind')!r}")
    config.data.image_size = saved["preprocessing"]["image_size"]
    config.data.labels = list(saved["labels"])
    dataset = build_datasets(config)[split]
    if len(dataset) == 0:
        raise UsageError(f"the {split} split of {config.data.root} is empty")
    model = vit_from_architecture(saved["architecture"])
    model.load_state_dict(weights)
    model.eval()
    probabilities = predict(model, dataset, config.train.eval_batch_size)
    return {"split": split, "samples": len(dataset),
            **multilabel_metrics(probabilities, dataset.labels.numpy(), dataset.label_names)}
