from __future__ import annotations

from pathlib import Path

import pytest

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
