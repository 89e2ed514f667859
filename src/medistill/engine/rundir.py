"""The run directory: resolved config, environment, logs, metrics, checkpoints, report."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from medistill import __version__
from medistill.config import dump_config
from medistill.engine.logging import JsonlLog, write_json
from medistill.errors import UsageError
from medistill.engine.distributed import main_only


def prepare_output_dir(path: str | Path, *, resume: bool = False) -> Path:
    """Create `path` (or check it for resuming) and prove it is writable, before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {path} exists and is not a directory: choose another --out")
    if not resume and path.is_dir() and (path / "train_state.pt").exists():
        raise UsageError(f"{path} already holds a run: continue it with --resume {path}, or choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"  # one per process: torchrun ranks check at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write to {path} ({error.strerror}): choose a writable --out") from None
    return path


def environment() -> dict[str, Any]:
    """What is needed to reproduce a run: versions, machine, git commit."""
    env: dict[str, Any] = {
        "medistill": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": sys.argv,
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        env["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


class RunDir:
    """Paths and writers of one run directory (see docs/architecture.md for its contents)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.log = JsonlLog(self.path / "log.jsonl")

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def train_state(self) -> Path:
        return self.path / "train_state.pt"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @main_only
    def write_config(self, config: Any) -> None:
        dump_config(config, self.config_file)
        write_json(self.path / "environment.json", environment())

    def read_config_data(self) -> dict[str, Any]:
        if not self.config_file.exists():
            raise UsageError(f"{self.path} has no config.yaml: is it a medistill run directory?")
        return yaml.safe_load(self.config_file.read_text(encoding="utf-8"))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / "metrics.json", metrics)
