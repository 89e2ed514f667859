from pathlib import Path

import pytest
import torch

from medistill.engine.checkpoint import load_train_state, save_train_state
from medistill.errors import UsageError


class Payload:
    """A pickle that would create a file when unpickled by a loader that runs code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_train_state_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "train_state.pt"
    torch.save({"progress": {"step": 1}, "payload": Payload(marker)}, evil)
    with pytest.raises(UsageError, match="refusing to load"):
        load_train_state(evil)
    assert not marker.exists()


def test_a_plain_train_state_round_trips(tmp_path):
    state = {"progress": {"step": 3}, "rng": torch.arange(4)}
    save_train_state(tmp_path / "train_state.pt", state)
    loaded = load_train_state(tmp_path / "train_state.pt")
    assert loaded["progress"] == {"step": 3} and torch.equal(loaded["rng"], torch.arange(4))


def test_a_missing_train_state_says_what_to_do(tmp_path):
    with pytest.raises(UsageError, match="no saved state"):
        load_train_state(tmp_path / "train_state.pt")
