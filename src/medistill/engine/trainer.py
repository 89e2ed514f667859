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
import shutil
import signal
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from medistill.config import OptimConfig, TrainConfig
from medistill.data.privacy import case_id
from medistill.engine import distributed
from medistill.engine.checkpoint import (WEIGHTS, load_train_state, load_weights, save_checkpoint, save_train_state,
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
    if name == "cuda" and distributed.launched_by_torchrun():
        return torch.device("cuda", distributed.local_rank())  # one GPU per process
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


def sampler_seed(seed: int) -> int:
    """Spread run seeds apart: DistributedSampler shuffles with `seed + epoch`, so seed 1 would replay seed 0's
    orders one epoch late."""
    return seed * 100_003


def epoch_batches(size: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch) so a resumed run sees the same.

    The permutation is `DistributedSampler`'s with seed `sampler_seed(seed)` at this epoch, so the global
    batches of a multi-process run are exactly these. `drop_last` drops an incomplete final batch
    (contrastive losses need whole batches), unless it is the only one.
    """
    generator = torch.Generator().manual_seed(sampler_seed(seed) + epoch)
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
    bad_steps: int = 0  # batches skipped for a non-finite loss (train.max_bad_steps)
    history: list[dict[str, Any]] = field(default_factory=list)


class Interrupted(MedistillError):
    """SIGTERM or Ctrl-C: the state was saved at a step boundary and the run can be resumed."""

    exit_code = 130


class _TaskLoss(torch.nn.Module):
    """The task's loss terms as a module's forward. DDP synchronises the gradients of what runs inside its
    forward, so wrapping this (and through it the task's trainable model) works for tasks that call several
    parts of their model rather than one forward."""

    def __init__(self, task: TrainTask) -> None:
        super().__init__()
        self.model = task.model
        self.task = task

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.task.loss_terms(batch)


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
        self.world = distributed.world_size()
        if train.batch_size % self.world:
            raise UsageError(f"train.batch_size {train.batch_size} is the global batch and must divide by the "
                             f"{self.world} processes")
        if train.workers < 0:
            raise UsageError(f"train.workers must be 0 (batches prepared in the training process) or more, not "
                             f"{train.workers}")
        if train.parallel not in ("ddp", "fsdp"):
            raise UsageError(f"train.parallel must be ddp or fsdp, not {train.parallel!r}")
        if train.parallel == "fsdp" and self.dtype == torch.float16:
            raise UsageError("train.parallel: fsdp trains in fp32 or bf16: set train.precision to bf16")
        self.model = task.model.to(self.device)
        self.wrapped = self._wrap()
        self.sharded = self.wrapped is not None and train.parallel == "fsdp"
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
        )
        self.batches_per_epoch = len(self.local_batches(0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / optim.accumulate)
        self.total_steps = self.steps_per_epoch * train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(optim.warmup_steps, self.total_steps, optim.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.progress = Progress()
        self._stop_signal: str | None = None
        es = train.early_stopping
        if es.mode not in ("max", "min"):
            raise UsageError(f"train.early_stopping.mode must be max or min, not {es.mode!r}")

    # -- state -------------------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module | None:
        """DDP or FSDP around the trainable model when torchrun started several processes (None otherwise, and
        for a model with nothing to train). Under DDP unused parameters are allowed: variants switch parts off.
        A model an earlier stage sharded keeps its FSDP root, which now runs this task's loss."""
        if self.world == 1 or not any(p.requires_grad for p in self.model.parameters()):
            return None
        if self.cfg.parallel == "fsdp":
            root = distributed.fsdp_root(self.model)
            if root is None:
                return distributed.shard(_TaskLoss(self.task), self.model)
            distributed.close_after_use(root)
            root.task = self.task
            return root
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(_TaskLoss(self.task), find_unused_parameters=True,
                                       device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def save_state(self) -> None:
        """Model weights as safetensors and optimiser/scheduler/RNG/progress as train_state.pt. Every rank calls
        this (FSDP gathers the shards); rank 0 writes.

        The weights go to a new file named by the step first, then train_state.pt (which names it) replaces
        the old one atomically, and only then is the old weights file removed: a kill at any moment leaves a
        train_state.pt whose weights file exists.
        """
        name = f"train_model-{self.progress.step:08d}.safetensors"
        save_weights(self.model, self.run.path / name, {"step": str(self.progress.step)})
        optimizer = distributed.optimizer_state(self.model, self.optimizer)
        if not distributed.is_main():
            return
        save_train_state(self.run.train_state, {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "progress": vars(self.progress),
            "weights": name,
        })
        for old in self.run.path.glob("train_model*.safetensors"):
            if old.name != name:
                old.unlink()

    def check_room(self) -> None:
        """Fail before training, not at the first checkpoint, when the run directory cannot take one."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        trainable = sum(p.numel() * 4 for p in self.model.parameters() if p.requires_grad)
        needed = 2 * weights + 2 * trainable  # the old and new weights files at once, AdamW's two moments
        free = shutil.disk_usage(self.run.path).free
        if free < needed:
            raise UsageError(f"{self.run.path} has {free / 2**20:.0f} MiB free but a checkpoint needs about "
                             f"{needed / 2**20:.0f} MiB: free some space or choose another --out")

    def load_state(self) -> None:
        from safetensors.torch import safe_open

        state = load_train_state(self.run.train_state)
        weights_file = self.run.path / state.get("weights", "train_model.safetensors")
        with safe_open(str(weights_file), "pt") as handle:
            saved_step = int(handle.metadata().get("step", -1))
        if saved_step != state["progress"]["step"]:
            raise MedistillError(f"{weights_file} (step {saved_step}) does not match train_state.pt "
                                 f"(step {state['progress']['step']}): the run directory was modified")
        load_weights(self.model, weights_file)
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.progress = Progress(**state["progress"])
        log.info("resumed at step %d (epoch %d, batch %d)", self.progress.step, self.progress.epoch,
                 self.progress.batch_in_epoch)

    # -- loop --------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False) -> Progress:
        """Train to the end (or early stop), save the selected model in `checkpoints/` and leave it loaded, in eval mode."""
        self.check_room()
        if resume:
            self.load_state()
        else:
            seed_everything(self.cfg.seed)
            self.run.log.write("start", total_steps=self.total_steps, precision=str(self.dtype),
                               device=str(self.device), train_samples=len(self.data),  # type: ignore[arg-type]
                               processes=self.world)
        bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="train", unit="step",
                   disable=not (self.cfg.progress and sys.stderr.isatty() and distributed.is_main()), leave=False)
        started = time.perf_counter()
        previous = self._catch_stop_signals()
        try:
            while self.progress.epoch < self.cfg.epochs and not self.progress.stopped_early:
                self._run_epoch(bar)
        finally:
            bar.close()
            for number, handler in previous.items():
                signal.signal(number, handler)
        if self.cfg.early_stopping.metric is None or self.progress.best_step is None:
            save_checkpoint(self.run.checkpoint_dir, self.task.checkpoint_module(), self.task.checkpoint_config())
        else:  # early stopping selected an earlier step
            distributed.barrier()  # rank 0 wrote it
            load_weights(self.task.checkpoint_module(), self.run.checkpoint_dir / WEIGHTS)
        distributed.barrier()  # whatever reads the checkpoint next, on any rank, finds it written
        if self.sharded:  # usable through any of its methods now, as long as every rank makes the same calls
            distributed.open_for_use(self.wrapped)  # type: ignore[arg-type]
        self.model.eval()
        self.run.log.write("end", step=self.progress.step, seconds=time.perf_counter() - started,
                           best_step=self.progress.best_step, stopped_early=self.progress.stopped_early)
        return self.progress

    def _catch_stop_signals(self) -> dict[int, Any]:
        """SIGTERM and Ctrl-C ask the loop to save at the next step boundary and stop (main thread only)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(number: int, frame: Any) -> None:
            self._stop_signal = signal.Signals(number).name

        return {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGINT)}

    def _loader(self, batches: Sequence[list[int]]) -> DataLoader:
        # A private generator: creating a loader iterator must not draw from the global RNG, or a
        # resumed run (which creates one mid-epoch) would see different dropout masks.
        generator = torch.Generator().manual_seed(self.cfg.seed + self.progress.epoch)
        return DataLoader(self.data, batch_sampler=batches, collate_fn=self.collate, generator=generator,
                          num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda")

    def batches_of_epoch(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch, shuffled by (seed, epoch). A subclass may order them otherwise (e.g.
        a curriculum), as a pure function of the epoch with the same number of batches, so resuming still works."""
        return epoch_batches(len(self.data), self.cfg.batch_size, self.cfg.seed, epoch, self.drop_last)  # type: ignore[arg-type]

    def local_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches: all of them in one process; under torchrun its share of every global batch,
        drawn by `DistributedSampler` (with `set_epoch`), whose shards of global batch k together are exactly
        the one-process batch k. A subclass's own order is sharded batch by batch."""
        if self.world == 1:
            return self.batches_of_epoch(epoch)
        rank, local = distributed.rank(), self.cfg.batch_size // self.world
        if type(self).batches_of_epoch is not Trainer.batches_of_epoch:
            return [(batch * self.world)[rank:max(len(batch), self.world):self.world]
                    for batch in self.batches_of_epoch(epoch)]
        sampler = DistributedSampler(self.data, num_replicas=self.world, rank=rank, shuffle=True,
                                     seed=sampler_seed(self.cfg.seed))
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i:i + local] for i in range(0, len(order), local)]
        return batches[:-1] if self.drop_last and len(batches) > 1 and len(batches[-1]) < local else batches

    def _run_epoch(self, bar: tqdm) -> None:
        p = self.progress
        batches = self.local_batches(p.epoch)
        self.model.train()
        pending = 0
        sums: dict[str, float] = {}
        for batch in self._loader(batches[p.batch_in_epoch:]):
            last_of_epoch = p.batch_in_epoch + 1 == len(batches)
            terms = self._forward_backward(batch, sync=pending + 1 == self.optim_cfg.accumulate or last_of_epoch)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            pending += 1
            p.batch_in_epoch += 1
            if pending == self.optim_cfg.accumulate or last_of_epoch:
                self._optimizer_step()
                self._after_step({k: v / pending for k, v in sums.items()}, bar, last_of_epoch)
                pending, sums = 0, {}
                if p.stopped_early:
                    return
                self._stop_if_signalled()

    def _stop_if_signalled(self) -> None:
        """After a SIGTERM or Ctrl-C on any rank: save at this step boundary on every rank's behalf, then stop."""
        if not distributed.any_rank(self._stop_signal is not None, self.device):
            return
        self.save_state()
        reason = self._stop_signal or "a stop signal on another process"
        self.run.log.write("interrupted", step=self.progress.step, signal=reason)
        raise Interrupted(f"stopped by {reason} at step {self.progress.step}; the state is saved: continue "
                          f"with --resume {self.run.path}")

    def _forward_backward(self, batch: Batch, sync: bool = True) -> dict[str, float]:
        """Loss terms of one (micro-)batch and their gradients; under DDP or FSDP gradients are averaged across
        ranks only when `sync` (the last micro-batch before an optimiser step)."""
        batch = move_to(batch, self.device)
        with self._gradient_sync(sync):
            with autocast(self.device, self.dtype):
                terms = self.wrapped(batch) if self.wrapped is not None else self.task.loss_terms(batch)
            loss = sum(terms.values())
            if distributed.any_rank(not bool(torch.isfinite(loss)), self.device):
                self._bad_batch(batch, terms, loss)
                return {}
            self.scaler.scale(loss / self.optim_cfg.accumulate).backward()
        return {k: float(v.detach()) for k, v in terms.items()}

    def _gradient_sync(self, sync: bool) -> Any:
        """A context in which backward averages gradients across ranks only if `sync`."""
        if self.sharded:
            self.wrapped.set_requires_gradient_sync(sync)  # type: ignore[union-attr,operator]
            return nullcontext()
        if self.wrapped is None or sync:
            return nullcontext()
        return self.wrapped.no_sync()  # type: ignore[operator]

    def _bad_batch(self, batch: Batch, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """A non-finite loss on some rank: skip the batch (up to train.max_bad_steps) or stop, naming the step,
        every rank's sample ids and the loss terms; the last saved state stays as it was. Under FSDP the skip
        drops the gradients of the whole optimiser step (FSDP's backward must run, and it runs on this loss)."""
        p = self.progress
        values = {k: float(v.detach()) for k, v in terms.items()}
        samples = [case_id(str(uid)) for part in distributed.gather(list(batch.get("uid", []))) for uid in part] \
            or "unknown"
        p.bad_steps += 1
        self.run.log.write("bad_batch", step=p.step, terms=values, samples=samples, bad_steps=p.bad_steps)
        if p.bad_steps > self.cfg.max_bad_steps:
            saved = load_train_state(self.run.train_state)["progress"]["step"] if self.run.train_state.exists() \
                else None
            kept = f"the last good state (step {saved}) is in {self.run.path}" if saved is not None else \
                "no state was saved yet"
            raise MedistillError(f"non-finite loss at step {p.step} (terms {values}, samples {samples}, salted "
                                 f"ids: docs/scaling.md); {kept}; lower optim.lr, check these samples, or allow "
                                 f"skips with train.max_bad_steps")
        log.warning("non-finite loss at step %d (samples %s): batch skipped (%d of train.max_bad_steps=%d)",
                    p.step, samples, p.bad_steps, self.cfg.max_bad_steps)
        if self.sharded:
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
        elif self.wrapped is not None:  # every rank skipped: finish DDP's gradient reduction with zeros
            trainable = [q for q in self.model.parameters() if q.requires_grad]
            (sum(q.sum() for q in trainable) * 0.0).backward()

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
        """Validation metrics over the whole split, computed on rank 0 (on every rank under FSDP, whose blocks
        gather their parameters from all ranks) and shared, so every rank takes the same early-stopping
        decision."""
        p = self.progress
        metrics: dict[str, float] | None = None
        if distributed.is_main() or self.sharded:
            self.model.eval()
            gathered = distributed.unsharded(self.wrapped) if self.sharded else nullcontext()  # type: ignore[arg-type]
            with gathered, torch.no_grad(), autocast(self.device, self.dtype):
                metrics = self.task.evaluate("val")
            self.model.train()
        metrics = distributed.broadcast(metrics)
        assert metrics is not None
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
