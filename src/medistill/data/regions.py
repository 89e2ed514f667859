"""Regions of interest as boolean masks at a working image size (from mask files, boxes or circles)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from medistill.data.imaging import load_image
from medistill.data.records import Record, Region


def original_size(record: Record) -> tuple[int, int]:
    """(width, height) of the record's image, from the record or the file header."""
    if record.image_size and all(record.image_size):
        return int(record.image_size[0]), int(record.image_size[1])
    if record.image is None:
        raise ValueError(f"record {record.uid} has no image")
    with Image.open(record.image) as image:
        return image.size


def load_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """A region mask file as a boolean array resized to (height, width) with nearest-neighbour sampling."""
    image = Image.fromarray((load_image(path) > 0.5).astype(np.uint8) * 255)
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST)) > 127


def region_mask(record: Record, region: Region, size: int) -> np.ndarray:
    """The region as a (size, size) boolean mask of the image resized to size x size."""
    if region.mask:
        return load_mask(region.mask, (size, size))
    width, height = original_size(record)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    xs, ys = xs * width / size, ys * height / size
    if region.circle is not None:
        c = region.circle
        return (xs - c.cx) ** 2 + (ys - c.cy) ** 2 <= c.radius**2
    if region.box is not None:
        b = region.box
        return (xs >= b.x1) & (xs <= b.x2) & (ys >= b.y1) & (ys <= b.y2)
    raise ValueError(f"region {region.label!r} of record {record.uid} has no mask, box or circle")


def regions_of_interest(record: Record, label_names: list[str]) -> list[Region]:
    """The regions an attention map should find.

    When the label set names the regions (chest findings), the regions of positive labels; when it does
    not (mammography's 'malignant' over 'mass' and 'calcification' regions), every region of the record.
    Regions without a location (mini-MIAS calcifications without coordinates) cannot be scored and are left out.
    """
    located = [r for r in record.regions if r.mask or r.box or r.circle]
    named = [r for r in located if r.label in label_names]
    if named:
        return [r for r in named if record.labels.get(r.label) == 1.0]
    return [] if any(r.label in label_names for r in record.regions) else located


def union_mask(record: Record, regions: list[Region], size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for region in regions:
        mask |= region_mask(record, region, size)
    return mask
