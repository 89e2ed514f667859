"""Multi-process training and fault tolerance through the real CLI: torchrun with 2 CPU processes (gloo) against
1 process, SIGKILL at an arbitrary step then --resume, SIGTERM, and a kill in the middle of a checkpoint write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def cxr_phantom(tmp_path_factory) -> Path:
    """32 phantom chest X-ray cases: 20 training images, so batches of 4 (2 x 2 across processes) all fill."""
    from medistill.data.phantom import PhantomKnobs, write_phantom

    root = tmp_path_factory.mktemp("cxr") / "world"
    write_phantom(root, cases=32, seed=0, modalities=["cxr"], knobs=PhantomKnobs(image_size=32))
    return root


def classifier_recipe(tmp_path: Path, phantom: Path, **train: object) -> Path:
    """A tiny classifier: fp32 on the CPU and no dropout or augmentation, so runs can be compared exactly."""
    recipe = {
        "method": "classifier",
        "data": {"format": "phantom", "root": str(phantom), "options": {"task": "labels"}, "modality": "cxr",
                 "image_size": 32},
        "model": {"name": "vit-nano", "patch_size": 8},
        "optim": {"lr": 0.003, "warmup_steps": 2},
        "train": {"seed": 0, "epochs": 3, "batch_size": 4, "precision": "fp32", "device": "cpu", "log_every": 1,
                  "progress": False, **train},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def medistill(*args: str) -> list[str]:
    return [sys.executable, "-m", "medistill", *args]


def torchrun(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "medistill", *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_state(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return metrics, load_file(str(out / "checkpoints" / "model.safetensors"))


def numbers(value: object) -> list[float]:
    """Every number in a metrics tree, in a stable order."""
    if isinstance(value, dict):
        return [n for key in sorted(value) for n in numbers(value[key])]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(cxr_phantom, tmp_path, parallel):
    """Same global batch (4 = 2 x 2), same permutation (DistributedSampler's): each step's gradient is the
    mean over the same 4 images, averaged across ranks by DDP instead of within one batch, so only the order
    of floating-point sums differs (~1e-7). Adam divides each gradient by its running RMS, which turns that
    noise into full-size steps for parameters whose true gradient is ~0 (attention key biases: softmax ignores
    them), so after 15 steps of lr 3e-3 such weights may differ by up to ~1e-4 (2e-5 observed); every other
    weight agrees to ~1e-6. Hence atol 1e-4 on weights, and 1e-3 on metrics, below the 1/(pos x neg) step by
    which an AUROC on these few images moves, so a real divergence would show. FSDP shards the ViT's blocks and
    reduce-scatters instead of all-reducing: the same sums, the same tolerance."""
    recipe = classifier_recipe(tmp_path, cxr_phantom, parallel=parallel)
    run(medistill("train", "--config", str(recipe), "--out", str(tmp_path / "one")))
    result = run(torchrun(2, "train", "--config", str(recipe), "--out", str(tmp_path / "two")))
    assert result.stdout.count("run finished") == 1  # only rank 0 talks to the user

    one_metrics, one_weights = final_state(tmp_path / "one")
    two_metrics, two_weights = final_state(tmp_path / "two")
    for name, tensor in one_weights.items():
        assert torch.allclose(tensor, two_weights[name], rtol=1e-3, atol=1e-4), name
    assert numbers(one_metrics) == pytest.approx(numbers(two_metrics), abs=1e-3)
    start = [e for e in map(json.loads, (tmp_path / "two" / "log.jsonl").read_text().splitlines())
             if e["event"] == "start"]
    assert len(start) == 1 and start[0]["processes"] == 2  # one log, written by rank 0
    steps = [e["step"] for e in map(json.loads, (tmp_path / "two" / "log.jsonl").read_text().splitlines())
             if e["event"] == "train"]
    assert steps == sorted(set(steps))


def wait_for_state(out: Path, process: subprocess.Popen, step: int) -> None:
    """Block until the run has saved its state at `step` or later (it must still be running)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted: make it longer"
        state = out / "train_state.pt"
        if state.exists():
            try:
                saved = torch.load(state, weights_only=True)["progress"]["step"]
            except Exception:  # mid-rename; try again
                saved = -1
            if saved >= step:
                return
        time.sleep(0.02)
    raise AssertionError("no saved state in time")


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(cxr_phantom, tmp_path, stop):
    """SIGKILL at an arbitrary step, or SIGTERM (which saves at the next step boundary and exits cleanly),
    then `--resume`: the final weights and metrics equal an uninterrupted run's bit for bit."""
    recipe = classifier_recipe(tmp_path, cxr_phantom, epochs=6, checkpoint_every=2)
    run(medistill("train", "--config", str(recipe), "--out", str(tmp_path / "whole")))

    out = tmp_path / "stopped"
    process = subprocess.Popen(medistill("train", "--config", str(recipe), "--out", str(out)), cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_state(out, process, 3)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    if stop == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130 and "--resume" in stderr and "Traceback" not in stderr, stderr
        events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert events[-1] == "interrupted"
    assert not (out / "metrics.json").exists()
    run(medistill("train", "--resume", str(out)))

    whole_metrics, whole_weights = final_state(tmp_path / "whole")
    metrics, weights = final_state(out)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in whole_weights.items())
    assert numbers(metrics) == numbers(whole_metrics)


@pytest.mark.slow
def test_a_sharded_run_stopped_by_sigterm_resumes_to_the_uninterrupted_result(cxr_phantom, tmp_path):
    """FSDP under torchrun: SIGTERM to torchrun reaches both workers, which gather the shards, save at the
    next step boundary and exit; `torchrun ... --resume` loads the full state back into the shards and ends
    bit for bit where an uninterrupted sharded run ends."""
    recipe = classifier_recipe(tmp_path, cxr_phantom, epochs=6, checkpoint_every=2, parallel="fsdp")
    run(torchrun(2, "train", "--config", str(recipe), "--out", str(tmp_path / "whole")))

    out = tmp_path / "stopped"
    process = subprocess.Popen(torchrun(2, "train", "--config", str(recipe), "--out", str(out)), cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_state(out, process, 3)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode != 0
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "interrupted" and events[-1]["step"] < 30
    assert not (out / "metrics.json").exists()
    run(torchrun(2, "train", "--resume", str(out)))

    whole_metrics, whole_weights = final_state(tmp_path / "whole")
    metrics, weights = final_state(out)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in whole_weights.items())
    assert numbers(metrics) == numbers(whole_metrics)
