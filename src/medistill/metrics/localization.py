"""Zero-shot localization of attention maps against ground-truth regions, each beside its chance level.

Every function takes a saliency map and a boolean region mask of the same (H, W) shape.
Chance levels are those of a map that carries no information:
- pointing game: the region's area fraction (a uniformly random maximum lands inside with that probability);
- attention mass inside the region: the area fraction (uniform attention);
- IoU / Dice of the top-k% pixels: expected value for k% chosen at random;
- pixel AUROC: 0.5.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def pointing_game(saliency: np.ndarray, region: np.ndarray) -> float:
    """1.0 when the map's maximum lies inside the region (ties: any maximum inside counts)."""
    return float(region[saliency >= saliency.max()].any())


def mass_inside(saliency: np.ndarray, region: np.ndarray) -> float:
    """Share of the (non-negative) attention mass that falls inside the region."""
    weights = np.clip(saliency, 0, None)
    total = weights.sum()
    return float(weights[region].sum() / total) if total > 0 else float(region.mean())


def top_fraction_mask(saliency: np.ndarray, fraction: float) -> np.ndarray:
    """The `fraction` of pixels with the highest saliency (ties broken by position, so the count is exact)."""
    count = max(1, int(round(fraction * saliency.size)))
    order = np.argsort(-saliency.ravel(), kind="stable")[:count]
    mask = np.zeros(saliency.size, dtype=bool)
    mask[order] = True
    return mask.reshape(saliency.shape)


def iou_dice(predicted: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    intersection = float(np.logical_and(predicted, region).sum())
    union = float(np.logical_or(predicted, region).sum())
    size = float(predicted.sum() + region.sum())
    return (intersection / union if union else 0.0, 2 * intersection / size if size else 0.0)


def pixel_auroc(saliency: np.ndarray, region: np.ndarray) -> float:
    if region.all() or not region.any():
        return float("nan")
    return float(roc_auc_score(region.ravel(), saliency.ravel()))


def chance_iou_dice(area_fraction: float, top_fraction: float) -> tuple[float, float]:
    """Expected IoU and Dice of a random top-k% mask against a region covering `area_fraction` of the image."""
    intersection = area_fraction * top_fraction
    union = area_fraction + top_fraction - intersection
    return (intersection / union if union else 0.0,
            2 * intersection / (area_fraction + top_fraction) if area_fraction + top_fraction else 0.0)


def localization_metrics(saliency: np.ndarray, region: np.ndarray, top_fraction: float = 0.1) -> dict[str, float]:
    """All localization scores of one map, with the chance level of each under `chance/...`."""
    if saliency.shape != region.shape:
        raise ValueError(f"saliency {saliency.shape} and region {region.shape} differ in shape")
    region = region.astype(bool)
    area = float(region.mean())
    iou, dice = iou_dice(top_fraction_mask(saliency, top_fraction), region)
    chance_iou, chance_dice = chance_iou_dice(area, top_fraction)
    return {
        "pointing_game": pointing_game(saliency, region),
        "mass_inside": mass_inside(saliency, region),
        "iou_top": iou,
        "dice_top": dice,
        "pixel_auroc": pixel_auroc(saliency, region),
        "chance/pointing_game": area,
        "chance/mass_inside": area,
        "chance/iou_top": chance_iou,
        "chance/dice_top": chance_dice,
        "chance/pixel_auroc": 0.5,
    }
