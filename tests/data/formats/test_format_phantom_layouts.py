"""The phantom world writes the public layouts; each reader must read them as it reads real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from medistill.data.checks import check_dataset

pytest.importorskip("medistill.data.phantom")


@pytest.fixture(scope="module")
def phantom_world(tmp_path_factory) -> Path:
    from medistill.data.phantom import PhantomKnobs, write_phantom

    root = tmp_path_factory.mktemp("phantom-layouts") / "world"
    write_phantom(root, cases=6, seed=0, knobs=PhantomKnobs(image_size=64))
    return root


@pytest.mark.parametrize("name", ["vqa-rad", "mimic-cxr", "cbis-ddsm", "med-grit"])
def test_reader_reads_the_phantom_folder(phantom_world, name):
    report = check_dataset(name, phantom_world / name)
    assert report["records"] > 0 and report["problems"] == [] and report["missing_images"] == []
    assert report["unreferenced_images"] == [] and report["leakage"] == []
    if name in ("mimic-cxr", "cbis-ddsm"):
        assert report["regions"]["total"] > 0
    if name == "med-grit":
        assert set(report["tasks"]) == {"VG", "ROC", "RC", "MIA"} and None not in report["modalities"]
    if name == "vqa-rad":
        assert set(report["splits"]) == {"train", "test"}
