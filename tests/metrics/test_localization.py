from __future__ import annotations

import numpy as np
import pytest

from medistill.metrics.localization import chance_iou_dice, localization_metrics, top_fraction_mask


def square_region(size=32, start=8, stop=16):
    region = np.zeros((size, size), dtype=bool)
    region[start:stop, start:stop] = True
    return region


def test_a_map_on_the_region_scores_high_and_chance_is_reported():
    region = square_region()
    metrics = localization_metrics(region.astype(float) + 0.001, region, top_fraction=region.mean())
    assert metrics["pointing_game"] == 1.0
    assert metrics["mass_inside"] > 0.9
    assert metrics["iou_top"] == pytest.approx(1.0) and metrics["dice_top"] == pytest.approx(1.0)
    assert metrics["pixel_auroc"] == pytest.approx(1.0)
    assert metrics["chance/mass_inside"] == pytest.approx(64 / 1024)
    assert metrics["chance/pixel_auroc"] == 0.5


def test_a_map_elsewhere_scores_low():
    region = square_region()
    metrics = localization_metrics(square_region(start=20, stop=28).astype(float), region)
    assert metrics["pointing_game"] == 0.0
    assert metrics["mass_inside"] == 0.0
    assert metrics["pixel_auroc"] < 0.5


def test_uniform_attention_has_mass_equal_to_area():
    region = square_region()
    assert localization_metrics(np.ones((32, 32)), region)["mass_inside"] == pytest.approx(region.mean())


def test_random_maps_average_to_the_chance_levels():
    rng = np.random.default_rng(0)
    region = square_region()
    runs = [localization_metrics(rng.random((32, 32)), region, 0.2) for _ in range(300)]
    chance_iou, chance_dice = chance_iou_dice(region.mean(), 0.2)
    assert np.mean([r["iou_top"] for r in runs]) == pytest.approx(chance_iou, abs=0.01)
    assert np.mean([r["dice_top"] for r in runs]) == pytest.approx(chance_dice, abs=0.01)
    assert np.mean([r["pointing_game"] for r in runs]) == pytest.approx(region.mean(), abs=0.03)
    assert np.mean([r["pixel_auroc"] for r in runs]) == pytest.approx(0.5, abs=0.01)


def test_top_fraction_is_exact_with_ties():
    assert top_fraction_mask(np.zeros((10, 10)), 0.25).sum() == 25
