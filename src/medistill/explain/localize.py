"""Zero-shot localization: how well a classifier's attention maps find the regions of interest."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medistill.data.datasets import ImageLabelDataset, normalise
from medistill.data.regions import regions_of_interest, union_mask
from medistill.explain.attention import attention_rollout, cls_attention, to_image
from medistill.metrics.localization import localization_metrics

MAP_KINDS = {"cls": cls_attention, "rollout": attention_rollout}


def localization_targets(dataset: ImageLabelDataset) -> tuple[list[int], np.ndarray]:
    """Indices of samples with a region of interest, and their masks at the dataset's image size."""
    indices, masks = [], []
    for index, record in enumerate(dataset.records):
        regions = regions_of_interest(record, dataset.label_names)
        if regions:
            mask = union_mask(record, regions, dataset.image_size)
            if mask.any() and not mask.all():
                indices.append(index)
                masks.append(mask)
    return indices, np.array(masks, dtype=bool).reshape(len(masks), dataset.image_size, dataset.image_size)


@torch.no_grad()
def attention_maps(model: torch.nn.Module, images: torch.Tensor, kinds: Sequence[str], batch_size: int = 64
                   ) -> dict[str, np.ndarray]:
    """Per kind, maps (N, H, W) in [0, 1] for uint8 images (N, H, W)."""
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    for start in range(0, len(images), batch_size):
        batch = normalise(images[start:start + batch_size].to(device)).unsqueeze(1)
        attentions = model(batch, return_attentions=True)["attentions"]
        for kind in kinds:
            parts[kind].append(to_image(MAP_KINDS[kind](attentions), images.shape[-1]).cpu())
    return {kind: torch.cat(p).numpy() if p else np.zeros((0, *images.shape[1:])) for kind, p in parts.items()}


def evaluate_localization(model: torch.nn.Module, dataset: ImageLabelDataset, kinds: Sequence[str],
                          top_fraction: float) -> dict[str, float]:
    """Mean localization metrics per map kind (`{kind}/{metric}`) and their chance levels (`chance/{metric}`)."""
    indices, masks = localization_targets(dataset)
    if not indices:
        return {}
    maps = attention_maps(model, dataset.images[indices], kinds)
    results: dict[str, float] = {"localized_images": float(len(indices))}
    for kind in kinds:
        per_image = [localization_metrics(maps[kind][i], masks[i], top_fraction) for i in range(len(indices))]
        for name in per_image[0]:
            value = float(np.nanmean([m[name] for m in per_image]))
            results[name if name.startswith("chance/") else f"{kind}/{name}"] = value
    return results
