"""FSDP (`train.parallel: fsdp`) in the shared trainer, with 2 gloo processes started in the test: which blocks
are sharded, gradient accumulation against one process, a skipped non-finite batch, and a model that stays
usable (and saved whole) after training. The whole CLI under torchrun is in test_fault_tolerance.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from medistill.config import OptimConfig, TrainConfig
from medistill.engine import distributed
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.engine.trainer import Trainer
from medistill.models import create_model
from test_trainer import Points  # tests/engine is on the path (no packages under tests/)


class Stack(nn.Module):
    """An input layer and a head around a ModuleList of residual blocks, called through a method other than
    forward (as the methods call their models)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h).squeeze(-1)


class StackTask:
    def __init__(self, nan_at_step: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = Stack()
        self.nan_at_step = nan_at_step
        self.trainer: Trainer | None = None

    def loss_terms(self, batch):
        terms = {"mse": ((self.model.predict(batch["x"]) - batch["y"]) ** 2).mean()}
        if self.trainer is not None and self.trainer.progress.step == self.nan_at_step:
            terms["mse"] = terms["mse"] * math.nan
        return terms

    @torch.no_grad()
    def evaluate(self, split):
        data = Points(32, seed=1)
        return {"mse": float(((self.model.predict(data.x) - data.y) ** 2).mean())}

    def checkpoint_config(self):
        return {"kind": "toy"}

    def checkpoint_module(self):
        return self.model


def train(out: Path, parallel: str, nan_at_step: int | None = None, max_bad_steps: int = 0,
          task: StackTask | None = None) -> StackTask:
    task = task or StackTask(nan_at_step)
    run = RunDir(prepare_output_dir(out, resume=True))
    settings = TrainConfig(epochs=3, batch_size=8, precision="fp32", device="cpu", progress=False, log_every=1,
                           parallel=parallel, max_bad_steps=max_bad_steps)
    trainer = Trainer(task, Points(), settings, OptimConfig(lr=0.02, warmup_steps=2, accumulate=2), run)
    task.trainer = trainer
    trainer.fit()
    return task


def _worker(rank: int, store_file: str, out: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        task = train(Path(out) / "fsdp", "fsdp")
        sharded = distributed.is_sharded(task.model)
        with torch.no_grad():  # after fit the model answers through any method, every rank alike
            prediction = task.model.predict(Points(4, seed=2).x)
        train(Path(out) / "again", "fsdp", task=task)  # a later stage trains the same sharded model again
        skipped = train(Path(out) / "skipped", "fsdp", nan_at_step=3, max_bad_steps=2)
        results[rank] = {"sharded": sharded, "prediction": prediction, "evaluate": skipped.evaluate("test")}
    finally:
        dist.destroy_process_group()


def test_shard_units_are_the_blocks():
    vit = create_model("vit-nano", image_size=32, patch_size=8, num_classes=2)
    assert distributed.shard_units(vit) == list(vit.blocks)
    stack = Stack()
    assert distributed.shard_units(stack) == list(stack.blocks)
    # a ModuleList of ModuleDicts: FSDP needs modules with a forward, so the dicts' entries are the blocks
    layers = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}) for _ in range(2))
    assert distributed.shard_units(nn.Sequential(layers)) == [layers[0]["a"], layers[0]["b"], layers[1]["a"],
                                                             layers[1]["b"]]

    class Decoder(nn.Module):  # a Hugging Face model names its blocks in _no_split_modules
        _no_split_modules = ["Layer"]

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(2))
            self.extra = nn.ModuleList([nn.Linear(2, 2)])

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.ModuleList([nn.Linear(2, 2)])

    decoder = Decoder()
    assert distributed.shard_units(decoder) == list(decoder.layers)


def test_two_sharded_processes_match_one_process_and_skip_a_bad_batch(tmp_path):
    """Accumulation of 2 micro-batches (FSDP reduces only at the last one) with a global batch of 8: the same
    steps as one process, so the weights agree to float noise amplified by Adam (see test_fault_tolerance);
    a NaN at step 3 (both its micro-batches) with max_bad_steps 2 drops that step and the run goes on."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), results), nprocs=2, join=True)
    single = train(tmp_path / "one", "fsdp")  # one process: parallel is ignored
    assert not distributed.is_sharded(single.model)

    one = load_file(str(tmp_path / "one" / "checkpoints" / "model.safetensors"))
    two = load_file(str(tmp_path / "fsdp" / "checkpoints" / "model.safetensors"))
    assert set(one) == set(two) == set(single.model.state_dict())
    for name, tensor in one.items():
        assert two[name].shape == tensor.shape  # whole tensors, not one rank's shard
        assert torch.allclose(tensor, two[name], atol=1e-5), name
    assert results[0]["sharded"] and results[1]["sharded"]
    with torch.no_grad():
        expected = single.model.predict(Points(4, seed=2).x)
    for rank in (0, 1):
        assert torch.allclose(results[rank]["prediction"], expected, atol=1e-4)

    events = [json.loads(line) for line in (tmp_path / "skipped" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "bad_batch"] == [3, 3]
    assert events[-1]["event"] == "end" and events[-1]["step"] == 12
    assert math.isfinite(results[0]["evaluate"]["mse"]) and results[0]["evaluate"] == results[1]["evaluate"]

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]

    # the second stage starts where the first ended (not from fresh weights) and moves the weights on
    assert losses("again")[0] < 0.5 * losses("fsdp")[0]
    assert losses("again")[0] == pytest.approx(losses("fsdp")[-1], rel=0.5)
    again = load_file(str(tmp_path / "again" / "checkpoints" / "model.safetensors"))
    assert not torch.equal(again["head.weight"], two["head.weight"])
