from __future__ import annotations

from pathlib import Path

import pytest
import yaml

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A small phantom world shared by the tests that only read it (64 px, 24 cases per modality)."""
    from medistill.data.phantom import PhantomKnobs, write_phantom

    root = tmp_path_factory.mktemp("phantom") / "world"
    write_phantom(root, cases=24, seed=0, knobs=PhantomKnobs(image_size=64))
    return root


@pytest.fixture
def shared_data() -> Path:
    """../shared/data when present; tests that need it skip cleanly otherwise."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cxr_images(tiny_phantom: Path) -> list[Path]:
    """Three phantom chest X-ray images."""
    return sorted((tiny_phantom / "images" / "cxr").rglob("*.png"))[:3]


@pytest.fixture(scope="session")
def classifier_checkpoint(tiny_phantom, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "run"
    recipe = out.parent / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "classifier",
        "data": {"format": "phantom", "root": str(tiny_phantom), "options": {"task": "labels"}, "modality": "cxr",
                 "image_size": 32},
        "model": {"name": "vit-nano", "patch_size": 8},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "device": "cpu", "progress": False}}))
    from medistill.cli import main

    assert main(["train", "--config", str(recipe), "--out", str(out)]) == 0
    return out / "checkpoints"


@pytest.fixture(scope="session")
def grounding_checkpoint(tiny_phantom, tmp_path_factory) -> Path:
    from medistill.methods.clinkd import GroundingModelConfig, Sample, build_grounder, train_grounding_tokenizer

    texts = [Sample("a", "x_ray_1.png", "Please locate the mass in the image.", "<ref>mass</ref><box>(1,2),(30,40)</box>",
                     "VG", "x_ray")]
    cfg = GroundingModelConfig(vocab_size=300, hidden=32, layers=1, heads=2, kv_heads=1, vision_depth=1,
                               vision_embed=32, vision_heads=2, patch_size=8, min_pixels=4096, max_pixels=4096)
    grounder = build_grounder(cfg, train_grounding_tokenizer(texts * 4, 300), 0)
    return grounder.save(tmp_path_factory.mktemp("grounding") / "checkpoints")
