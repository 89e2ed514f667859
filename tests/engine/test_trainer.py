from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from medistill.config import EarlyStoppingConfig, OptimConfig, TrainConfig
from medistill.data.privacy import case_id
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.engine.trainer import Trainer, resolve_precision, warmup_cosine
from medistill.errors import MedistillError, UsageError


class Points(Dataset):
    """y = 3 x0 - 2 x1 + noise."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 2, generator=g)
        self.y = self.x @ torch.tensor([3.0, -2.0]) + 0.01 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i], "uid": f"point-{i}"}


class Regression:
    def __init__(self, crash_at_step: int | None = None, metric_values: list[float] | None = None,
                 dropout: float = 0.2) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(dropout), torch.nn.Linear(8, 1))
        self.crash_at_step = crash_at_step
        self.calls = 0
        self.metric_values = metric_values
        self.trainer: Trainer | None = None

    def loss_terms(self, batch):
        if self.trainer and self.crash_at_step is not None and self.trainer.progress.step == self.crash_at_step:
            raise KeyboardInterrupt("simulated kill")
        prediction = self.model(batch["x"]).squeeze(-1)
        return {"mse": ((prediction - batch["y"]) ** 2).mean()}

    def evaluate(self, split):
        self.calls += 1
        if self.metric_values is not None:
            return {"score": self.metric_values[min(self.calls - 1, len(self.metric_values) - 1)]}
        with torch.no_grad():
            data = Points(32, seed=1)
            return {"mse": float(((self.model(data.x).squeeze(-1) - data.y) ** 2).mean())}

    def checkpoint_config(self):
        return {"kind": "toy"}

    def checkpoint_module(self):
        return self.model


def make_trainer(tmp_path, task, *, name="run", epochs=4, batch_size=8, accumulate=1, **train_kw) -> Trainer:
    run = RunDir(prepare_output_dir(tmp_path / name, resume=True))
    # CPU and fp32 so that the bit-for-bit resume check holds on any machine, GPUs included
    train = TrainConfig(epochs=epochs, batch_size=batch_size, precision="fp32", device="cpu", progress=False,
                        log_every=1, **train_kw)
    optim = OptimConfig(lr=0.05, warmup_steps=2, accumulate=accumulate, clip_grad_norm=None)
    trainer = Trainer(task, Points(), train, optim, run)
    task.trainer = trainer
    return trainer


def test_training_learns_and_writes_the_run_directory(tmp_path):
    task = Regression()
    trainer = make_trainer(tmp_path, task, epochs=15)
    before = task.evaluate("val")["mse"]
    trainer.fit()
    after = task.evaluate("val")["mse"]
    assert after < 0.1 * before
    run = tmp_path / "run"
    assert set(load_file(str(run / "checkpoints" / "model.safetensors"))) == set(task.model.state_dict())
    assert json.loads((run / "checkpoints" / "config.json").read_text()) == {"kind": "toy"}
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert sum(e["event"] == "eval" for e in events) == 15  # once per epoch
    assert (run / "train_state.pt").exists()


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    whole = Regression()
    make_trainer(tmp_path, whole, name="whole", checkpoint_every=3).fit()

    broken = Regression(crash_at_step=10)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, broken, name="resumed", checkpoint_every=3).fit()
    resumed = Regression()
    make_trainer(tmp_path, resumed, name="resumed", checkpoint_every=3).fit(resume=True)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_worker_processes_prepare_the_same_batches(tmp_path):
    """train.workers moves batch preparation into DataLoader workers: the same batches in the same order, so
    the same weights (dropout draws stay in the training process)."""
    inline, workers = Regression(), Regression()
    make_trainer(tmp_path, inline, name="inline").fit()
    make_trainer(tmp_path, workers, name="workers", workers=2).fit()
    for name, tensor in inline.model.state_dict().items():
        assert torch.equal(tensor, workers.model.state_dict()[name]), name
    with pytest.raises(UsageError, match="train.workers"):
        make_trainer(tmp_path, Regression(), name="bad", workers=-1)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big, small = Regression(dropout=0.0), Regression(dropout=0.0)
    big_trainer = make_trainer(tmp_path, big, name="big", batch_size=8, epochs=2)
    small_trainer = make_trainer(tmp_path, small, name="small", batch_size=4, accumulate=2, epochs=2)
    assert big_trainer.total_steps == small_trainer.total_steps == 16
    big_trainer.fit()
    small_trainer.fit()
    for name, tensor in big.model.state_dict().items():
        assert torch.allclose(tensor, small.model.state_dict()[name], atol=1e-5), name


def test_early_stopping_stops_and_keeps_the_best(tmp_path):
    task = Regression(metric_values=[0.5, 0.9, 0.8, 0.7, 0.6, 0.95])
    trainer = make_trainer(tmp_path, task, epochs=6,
                           early_stopping=EarlyStoppingConfig(metric="score", mode="max", patience=2))
    progress = trainer.fit()
    assert progress.stopped_early and progress.best_value == 0.9
    assert progress.step == 4 * trainer.steps_per_epoch


def test_unknown_early_stopping_metric(tmp_path):
    trainer = make_trainer(tmp_path, Regression(), early_stopping=EarlyStoppingConfig(metric="auroc"))
    with pytest.raises(UsageError, match="'auroc' is not among the evaluation metrics"):
        trainer.fit()


def nan_at(task: Regression, steps: set[int]):
    """Make the task's loss NaN (one term of two) at the given optimiser steps."""
    original = task.loss_terms

    def loss_terms(batch):
        terms = original(batch)
        if task.trainer.progress.step in steps:
            terms["bad"] = terms["mse"] * math.nan
        return terms

    task.loss_terms = loss_terms


def test_non_finite_loss_stops_with_the_step_samples_and_terms_and_keeps_the_last_state(tmp_path):
    task = Regression()
    trainer = make_trainer(tmp_path, task, checkpoint_every=2)
    nan_at(task, {5})
    with pytest.raises(MedistillError) as stop:
        trainer.fit()
    message = str(stop.value)
    assert "non-finite loss at step 5" in message and "'bad': nan" in message and "'mse'" in message
    batch = trainer.local_batches(0)[5]  # 8 batches an epoch: step 5 is epoch 0's sixth batch
    assert all(case_id(f"point-{i}") in message for i in batch)  # salted ids, never the raw sample ids
    assert "point-" not in message
    assert "last good state (step 4)" in message
    resumed = make_trainer(tmp_path, Regression())
    resumed.load_state()
    assert resumed.progress.step == 4
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "bad_batch" and events[-1]["samples"] == [case_id(f"point-{i}") for i in batch]


def test_bad_batches_may_be_skipped_up_to_a_limit(tmp_path):
    task = Regression()
    trainer = make_trainer(tmp_path, task, max_bad_steps=2, epochs=2)
    nan_at(task, {3, 9})
    trainer.fit()  # two skipped, the run finishes
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "bad_batch"] == [3, 9]
    assert all(math.isfinite(p.abs().sum().item()) for p in task.model.parameters())
    task = Regression()
    trainer = make_trainer(tmp_path, task, name="strict", max_bad_steps=2, epochs=2)
    nan_at(task, {3, 9, 11})
    with pytest.raises(MedistillError, match="non-finite loss at step 11"):
        trainer.fit()


@pytest.mark.parametrize("moment", ["after the weights, before the state", "in the middle of the state"])
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch, moment):
    """save_state writes the step's weights file, then train_state.pt (temporary name, then rename), then
    removes the old weights. A kill at either point leaves the previous state and its weights file."""
    import medistill.engine.trainer as trainer_module

    real_save = trainer_module.save_train_state
    calls = []

    def killed_on_third_save(path, state):
        calls.append(state["progress"]["step"])
        if len(calls) < 3:
            return real_save(path, state)
        if moment == "in the middle of the state":
            tmp = path.with_name(f".{path.name}.tmp-partial")
            tmp.write_bytes(b"PK\x03\x04 half a zip")  # what a kill leaves: a partial temporary file
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(trainer_module, "save_train_state", killed_on_third_save)
    task = Regression()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, task, checkpoint_every=2).fit()
    monkeypatch.setattr(trainer_module, "save_train_state", real_save)
    assert calls == [2, 4, 6]
    weights = sorted(path.name for path in (tmp_path / "run").glob("train_model-*.safetensors"))
    assert weights == ["train_model-00000004.safetensors", "train_model-00000006.safetensors"]  # old one kept
    resumed = make_trainer(tmp_path, Regression())
    resumed.load_state()  # the state of step 4 with its own weights file
    assert resumed.progress.step == 4
    resumed.fit(resume=True)
    whole = Regression()
    make_trainer(tmp_path, whole, name="whole").fit()
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_schedule_warms_up_then_decays():
    factor = warmup_cosine(4, 20, 0.1)
    assert [round(factor(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(12) < factor(8) < 1.0
    assert factor(20) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError):
        resolve_precision("fp8", cpu)
