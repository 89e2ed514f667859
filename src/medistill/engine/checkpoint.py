"""Checkpoints: weights as safetensors beside a config.json that suffices to predict; train state for resuming.

Every file is written to a temporary name and renamed into place, so a kill during a write leaves the
previous file intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medistill.engine.distributed import full_state_dict, is_main, is_sharded, load_full_state_dict, main_only
from medistill.engine.logging import write_json
from medistill.errors import UsageError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _atomic(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_weights(module: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Every rank calls this (an FSDP-sharded module is gathered first); rank 0 writes."""
    state = full_state_dict(module)
    if is_main():
        _write_weights(state, Path(path), metadata)


def _write_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    tmp = _atomic(path)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous().cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        # tied weights (e.g. a language model's input and output embeddings) share storage, which
        # safetensors refuses: each copy is stored under its own name and loads back into both
        tensors[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file into `module`; every rank calls this. A sharded module reads the file on rank 0
    only and each rank keeps its shard."""
    needed = is_main() or not is_sharded(module)
    load_full_state_dict(module, load_file(str(path), device="cpu") if needed else {})


def save_checkpoint(directory: str | Path, module: torch.nn.Module, config: dict[str, Any]) -> Path:
    """Write `model.safetensors` and `config.json` (architecture, preprocessing, vocabularies) into `directory`
    (every rank calls this; rank 0 writes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(module, directory / WEIGHTS)
    write_json(directory / CONFIG, config)
    return directory


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and config of a checkpoint directory, with errors that say which file is missing."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise UsageError(f"{directory} is not a medistill checkpoint: {name} is missing")
    config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    return load_file(str(directory / WEIGHTS)), config


@main_only
def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    tmp = _atomic(path)
    torch.save(state, tmp)
    tmp.replace(path)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Load resumable state with `weights_only=True`: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path} not found: the run has no saved state to resume from") from None
    except Exception as error:  # torch raises UnpicklingError and RuntimeError variants here
        raise UsageError(f"refusing to load {path}: it is not a plain medistill train state ({type(error).__name__})") from None
