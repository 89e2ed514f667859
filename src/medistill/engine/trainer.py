"""The trainer every method shares.

A method supplies a `TrainTask`: the trainable module, a function from a batch to named loss terms (the
trainer sums and logs them, the MDistiller / open_clip habit), an evaluation function, and the config a
checkpoint needs. The trainer owns the loop: AdamW, warm-up + cosine schedule, gradient clipping and
accumulation, autocast, periodic evaluation, early stopping, checkpoints and exact resumption.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medistill.config import OptimConfig, TrainConfig
from medistill.engine.checkpoint import (load_train_state, read_checkpoint, save_checkpoint, save_train_state,
                                         save_weights)
from medistill.engine.rundir import RunDir
from medistill.errors import MedistillError, UsageError

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class TrainTask(Protocol):
    """What a method gives the trainer."""

    model: torch.nn.Module

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms; the trainer optimises their sum."""

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current model on a split ("val" or "test")."""

    def checkpoint_config(self) -> dict[str, Any]:
        """Architecture, preprocessing and vocabularies: enough to predict with nothing else."""

    def checkpoint_module(self) -> torch.nn.Module:
        """The part of `model` a checkpoint keeps (e.g. the student without its distillation projection)."""


# ----------------------------------------------------------------------------------------------
# devices and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"train.device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `name` on `device`; None means plain fp32."""
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"train.precision must be auto, fp32, bf16 or fp16, not {name!r}")
    if name == "fp32":
        return None
    if name == "fp16":
        if device.type != "cuda":
            raise UsageError("train.precision=fp16 needs a GPU; on a CPU use bf16 or auto")
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def move_to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# schedule and randomness


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine down to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    """`random.setstate` wants nested tuples; a weights-only load returns lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def epoch_batches(size: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch) so a resumed run sees the same.

    `drop_last` drops an incomplete final batch (contrastive losses need whole batches), unless it is the only one.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    batches = [order[i:i + batch_size] for i in range(0, size, batch_size)]
    return batches[:-1] if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size else batches


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class Progress:
    """Where training stands; saved in `train_state.pt` and restored by `--resume`."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        task: TrainTask,
        train_data: Dataset,
        train: TrainConfig,
        optim: OptimConfig,
        run: RunDir,
        *,
        collate: Callable[[list[Any]], Batch] | None = None,
        drop_last: bool = False,
    ) -> None:
        if len(train_data) == 0:  # type: ignore[arg-type]
            raise UsageError("the training split is empty: check the data root, format and filters")
        if optim.accumulate < 1:
            raise UsageError("optim.accumulate must be at least 1")
        self.task = task
        self.data = train_data
        self.cfg = train
        self.optim_cfg = optim
        self.run = run
        self.collate = collate
        self.drop_last = drop_last
        self.device = resolve_device(train.device)
        self.dtype = resolve_precision(train.precision, self.device)
        self.model = task.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
        )
        self.batches_per_epoch = len(epoch_batches(len(train_data), train.batch_size, 0, 0, drop_last))  # type: ignore[arg-type]
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / optim.accumulate)
        self.total_steps = self.steps_per_epoch * train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(optim.warmup_steps, self.total_steps, optim.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.progress = Progress()
        es = train.early_stopping
        if es.mode not in ("max", "min"):
            raise UsageError(f"train.early_stopping.mode must be max or min, not {es.mode!r}")

    # -- state -------------------------------------------------------------------------------

    def save_state(self) -> None:
        """Model weights as safetensors and optimiser/scheduler/RNG/progress as train_state.pt."""
        save_weights(self.model, self.run.path / "train_model.safetensors", {"step": str(self.progress.step)})
        save_train_state(self.run.train_state, {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "progress": vars(self.progress),
        })

    def load_state(self) -> None:
        from safetensors.torch import load_file, safe_open

        state = load_train_state(self.run.train_state)
        weights_file = self.run.path / "train_model.safetensors"
        with safe_open(str(weights_file), "pt") as handle:
            saved_step = int(handle.metadata().get("step", -1))
        if saved_step != state["progress"]["step"]:
            raise MedistillError(f"{weights_file} (step {saved_step}) does not match train_state.pt "
                                 f"(step {state['progress']['step']}): the run directory was modified")
        self.model.load_state_dict(load_file(str(weights_file), device=str(self.device)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.progress = Progress(**state["progress"])
        log.info("resumed at step %d (epoch %d, batch %d)", self.progress.step, self.progress.epoch,
                 self.progress.batch_in_epoch)

    # -- loop --------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> Progress:
        """Train to the end (or early stop), save the selected model in `checkpoints/` and leave it loaded, in eval mode."""
        if resume:
            self.load_state()
        else:
            seed_everything(self.cfg.seed)
            self.run.log.write("start", total_steps=self.total_steps, precision=str(self.dtype),
                               device=str(self.device), train_samples=len(self.data))  # type: ignore[arg-type]
        bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="train", unit="step",
                   disable=not (self.cfg.progress and sys.stderr.isatty()), leave=False)
        started = time.perf_counter()
        try:
            while self.progress.epoch < self.cfg.epochs and not self.progress.stopped_early:
                self._run_epoch(bar)
        finally:
            bar.close()
        if self.cfg.early_stopping.metric is None or self.progress.best_step is None:
            save_checkpoint(self.run.checkpoint_dir, self.task.checkpoint_module(), self.task.checkpoint_config())
        else:  # early stopping selected an earlier step
            self.task.checkpoint_module().load_state_dict(read_checkpoint(self.run.checkpoint_dir)[0])
        self.model.eval()
        self.run.log.write("end", step=self.progress.step, seconds=time.perf_counter() - started,
                           best_step=self.progress.best_step, stopped_early=self.progress.stopped_early)
        return self.progress

    def _loader(self, batches: Sequence[list[int]]) -> DataLoader:
        # A private generator: creating a loader iterator must not draw from the global RNG, or a
        # resumed run (which creates one mid-epoch) would see different dropout masks.
        generator = torch.Generator().manual_seed(self.cfg.seed + self.progress.epoch)
        return DataLoader(self.data, batch_sampler=batches, collate_fn=self.collate, generator=generator,
                          num_workers=0, pin_memory=self.device.type == "cuda")

    def batches_of_epoch(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, shuffled by (seed, epoch). A subclass may order them otherwise (e.g. a
        curriculum), as a pure function of the epoch with the same number of batches, so resuming still works."""
        return epoch_batches(len(self.data), self.cfg.batch_size, self.cfg.seed, epoch, self.drop_last)  # type: ignore[arg-type]

    def _run_epoch(self, bar: tqdm) -> None:
        p = self.progress
        batches = self.batches_of_epoch(p.epoch)
        self.model.train()
        pending = 0
        sums: dict[str, float] = {}
        for batch in self._loader(batches[p.batch_in_epoch:]):
            terms = self._forward_backward(batch)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            pending += 1
            p.batch_in_epoch += 1
            last_of_epoch = p.batch_in_epoch == len(batches)
            if pending == self.optim_cfg.accumulate or last_of_epoch:
                self._optimizer_step()
                self._after_step({k: v / pending for k, v in sums.items()}, bar, last_of_epoch)
                pending, sums = 0, {}
                if p.stopped_early:
                    return

    def _forward_backward(self, batch: Batch) -> dict[str, float]:
        batch = move_to(batch, self.device)
        with autocast(self.device, self.dtype):
            terms = self.task.loss_terms(batch)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            values = {k: float(v.detach()) for k, v in terms.items()}
            raise MedistillError(f"non-finite loss at step {self.progress.step} (terms {values}, samples "
                                 f"{batch.get('uid', '?')}); lower optim.lr or check the data; the last good "
                                 f"state is in {self.run.path}")
        self.scaler.scale(loss / self.optim_cfg.accumulate).backward()
        return {k: float(v.detach()) for k, v in terms.items()}

    def _optimizer_step(self) -> None:
        if self.optim_cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def _after_step(self, terms: dict[str, float], bar: tqdm, last_of_epoch: bool) -> None:
        p = self.progress
        bar.update(1)
        if p.step % max(1, self.cfg.log_every) == 0 or last_of_epoch:
            loss = sum(terms.values())
            self.run.log.write("train", step=p.step, epoch=p.epoch, loss=loss, lr=self.scheduler.get_last_lr()[0],
                               **{f"loss/{k}": v for k, v in terms.items()})
            bar.set_postfix(loss=f"{loss:.4f}")
        eval_now = (self.cfg.eval_every and p.step % self.cfg.eval_every == 0) or (
            not self.cfg.eval_every and last_of_epoch)
        if last_of_epoch:
            p.epoch += 1
            p.batch_in_epoch = 0
        if eval_now:
            self._evaluate()
        save_now = (self.cfg.checkpoint_every and p.step % self.cfg.checkpoint_every == 0) or last_of_epoch \
            or p.stopped_early
        if save_now:
            self.save_state()

    def _evaluate(self) -> None:
        p = self.progress
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            metrics = self.task.evaluate("val")
        self.model.train()
        self.run.log.write("eval", step=p.step, epoch=p.epoch, **metrics)
        p.history.append({"step": p.step, **metrics})
        es = self.cfg.early_stopping
        if es.metric is None:
            return
        if es.metric not in metrics:
            raise UsageError(f"train.early_stopping.metric {es.metric!r} is not among the evaluation metrics "
                             f"({', '.join(sorted(metrics))})")
        value = float(metrics[es.metric])
        better = p.best_value is None or (value > p.best_value if es.mode == "max" else value < p.best_value)
        if better and math.isfinite(value):
            p.best_value, p.best_step, p.evals_since_best = value, p.step, 0
            save_checkpoint(self.run.checkpoint_dir, self.task.checkpoint_module(), self.task.checkpoint_config())
        else:
            p.evals_since_best += 1
            if p.evals_since_best >= es.patience:
                p.stopped_early = True
                log.info("early stop at step %d: %s has not improved for %d evaluations", p.step, es.metric,
                         es.patience)


def iterate_eval(dataset: Dataset, batch_size: int, collate: Callable | None, device: torch.device) -> Iterator[Batch]:
    """Evaluation batches in dataset order, on `device`."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in loader:
        yield move_to(batch, device)
