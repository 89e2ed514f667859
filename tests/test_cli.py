"""End-to-end: the console entry point on a tiny phantom set, and its answers to bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medistill.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medistill", *args], capture_output=True, text=True, cwd=REPO)


def test_every_subcommand_has_help_with_an_example(capsys):
    for command in (["data", "make-phantom"], ["data", "check"], ["train"], ["eval"], ["report"], ["demo"],
                    ["bench"], ["predict"], ["serve"], ["experiment"]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--help"])
        assert stop.value.code == 0
        assert "medistill" in capsys.readouterr().out.split("examples:")[1], command


@pytest.mark.parametrize("args, message", [
    (["data", "make-phantom", "--out", "{tmp}/p", "--cases", "0"], "cases"),
    (["data", "make-phantom", "--out", "{tmp}/p", "--cases", "-3"], "cases"),
    (["data", "make-phantom", "--out", "{tmp}/p", "--cases", "2", "--modalities", "pet-scan"], "pet-scan"),
    (["data", "make-phantom", "--out", "/proc/medistill/p", "--cases", "2"], "/proc/medistill"),
    (["data", "make-phantom", "--out", "/proc/p", "--cases", "2"], "/proc"),
    (["data", "make-phantom", "--out", "{tmp}/p", "--cases", "2", "--subtlety", "7"], "subtlety"),
    (["data", "make-phantom", "--out", "{tmp}/p"], "--cases"),
    (["train", "--config", "{tmp}/notyaml.yaml", "--out", "{tmp}/run"], "not valid YAML"),
    (["train", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/run"], "not found"),
    (["train", "--config", "{tmp}/ok.yaml", "--out", "{tmp}/run", "--set", "train.epochz=2"], "did you mean 'epochs'"),
    (["train", "--config", "{tmp}/ok.yaml", "--out", "{tmp}/run", "--set", "nokey"], "KEY=VALUE"),
    (["train", "--resume", "{tmp}/nothing"], "config"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "notyaml.yaml").write_text("method: [classifier\n  :::")
    (tmp_path / "ok.yaml").write_text("method: classifier\n")
    result = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_phantom_train_resume_eval_report(tmp_path):
    data = tmp_path / "phantom"
    made = run_cli("data", "make-phantom", "--out", str(data), "--cases", "30", "--seed", "1",
                   "--modalities", "cxr", "--image-size", "64")
    assert made.returncode == 0, made.stderr
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "classifier",
        "data": {"format": "phantom", "root": str(data), "modality": "cxr", "image_size": 32},
        "model": {"name": "vit-nano", "patch_size": 8},
        "train": {"epochs": 2, "batch_size": 8, "early_stopping": {"metric": "auroc", "patience": 3}},
    }))
    run = tmp_path / "run"
    trained = run_cli("train", "--config", str(recipe), "--out", str(run), "--set", "optim.lr=3e-4")
    assert trained.returncode == 0, trained.stderr
    for name in ("config.yaml", "environment.json", "log.jsonl", "metrics.json", "train_state.pt",
                 "checkpoints/model.safetensors", "checkpoints/config.json"):
        assert (run / name).is_file(), name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["optim"]["lr"] == 3e-4 and resolved["train"]["epochs"] == 2
    checkpoint = json.loads((run / "checkpoints" / "config.json").read_text())
    assert checkpoint["kind"] == "classifier" and checkpoint["preprocessing"]["image_size"] == 32
    assert checkpoint["labels"] and checkpoint["architecture"]["num_classes"] == len(checkpoint["labels"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["auroc"] <= 1.0

    again = run_cli("train", "--config", str(recipe), "--out", str(run))
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli("train", "--resume", str(run))  # already finished: nothing left to do
    assert resumed.returncode == 0, resumed.stderr

    evaluated = run_cli("eval", str(run / "checkpoints"), "--config", str(run / "config.yaml"), "--split", "test")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["auroc"] == pytest.approx(metrics["test"]["auroc"], abs=0.02)

    reported = run_cli("report", str(run))
    assert reported.returncode == 0, reported.stderr
    page = (run / "report.html").read_text()
    assert "test AUROC" in page and page.count("data:image/png;base64") >= 2
