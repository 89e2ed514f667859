from __future__ import annotations

import pytest
import torch

from medistill.data.augment import AugmentConfig, augment_images
from medistill.errors import ConfigError


def test_off_by_default_and_identity():
    images = torch.randn(3, 1, 16, 16)
    assert not AugmentConfig().active
    assert augment_images(images, AugmentConfig()) is images


def test_hflip_mirrors_about_half_of_the_images():
    torch.manual_seed(0)
    images = torch.randn(200, 1, 8, 8)
    out = augment_images(images, AugmentConfig(hflip=True))
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((mirrored | kept).all()) and 60 < int(mirrored.sum()) < 140


def test_shift_and_scale_move_content_within_bounds():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 32, 32)
    images[:, :, 14:18, 14:18] = 1.0  # a bright square in the middle
    out = augment_images(images, AugmentConfig(shift=0.125, scale=0.2))
    assert out.shape == images.shape and out.dtype == torch.float32
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mass = out[:, 0].sum((1, 2))
    centre_x = (out[:, 0] * xs).sum((1, 2)) / mass
    offset = centre_x - 15.5
    assert offset.abs().max() <= 0.125 * 32 + 1.0  # at most the shift (4 px) plus interpolation
    assert offset.std() > 1.0  # and the squares really moved, by different amounts
    assert not torch.allclose(mass, mass[0].expand_as(mass))  # zoom changes the square's area


def test_shift_keeps_grey_levels_at_the_edges():
    torch.manual_seed(0)
    images = torch.full((4, 1, 8, 8), 0.7)
    out = augment_images(images, AugmentConfig(shift=0.25, scale=0.3))
    assert torch.allclose(out, images, atol=1e-5)  # border padding: no black edges appear


@pytest.mark.parametrize("kwargs", [{"shift": 0.5}, {"shift": -0.1}, {"scale": 1.0}])
def test_bad_values_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="augment"):
        AugmentConfig(**kwargs)
