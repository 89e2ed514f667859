"""ClinKD: the distillation loss, the confidence margin, RCT's flagging and selection, the baselines, and one
end-to-end experiment on the tiny phantom through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from medistill.config import load_config
from medistill.errors import UsageError
from medistill.methods.clinkd import (ClinKDConfig, OrderedTrainer, Sample, baselines, box_quality, candidate_score,
                                      clinkd_loss, confidence_margin, flag_reasons, select_candidate, validate)

IGNORE = -100


def kl_by_hand(student: list[float], teacher: list[float], temperature: float) -> float:
    """KL(softmax(teacher / T) || softmax(student / T)) of one token, written out."""
    def softmax(logits: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in logits]
        return [e / sum(exps) for e in exps]

    p, q = softmax(teacher), softmax(student)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def ce_by_hand(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


@pytest.fixture
def logits() -> dict[str, torch.Tensor]:
    """Two sequences of 4 tokens over a 3-word vocabulary; answer tokens at positions 2, 3 (first sample) and
    3 (second sample), so the logits at positions 1, 2 and 2 predict them."""
    torch.manual_seed(0)
    student = torch.randn(2, 4, 3)
    teacher = torch.randn(2, 4, 3)
    labels = torch.tensor([[IGNORE, IGNORE, 2, 0], [IGNORE, IGNORE, IGNORE, 1]])
    return {"student": student, "teacher": teacher, "labels": labels}


def answer_tokens(data: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    return [(0, 1, 2), (0, 2, 0), (1, 2, 1)]  # (sample, logit position, target)


def test_kd_loss_is_alpha_kl_plus_ce_over_one_plus_alpha(logits) -> None:
    s, t = logits["student"], logits["teacher"]
    alpha, temperature = 0.5, 0.5
    tokens = answer_tokens(logits)
    ce = sum(ce_by_hand(s[b, i].tolist(), y) for b, i, y in tokens) / len(tokens)
    kl = sum(kl_by_hand(s[b, i].tolist(), t[b, i].tolist(), temperature) for b, i, _ in tokens) / len(tokens)
    terms = clinkd_loss(s, logits["labels"], t, alpha=alpha, temperature=temperature)
    assert set(terms) == {"ce", "kd"}
    assert float(terms["ce"]) == pytest.approx(ce / (1 + alpha), rel=1e-5)
    assert float(terms["kd"]) == pytest.approx(alpha * kl / (1 + alpha), rel=1e-5)
    assert float(sum(terms.values())) == pytest.approx((alpha * kl + ce) / (1 + alpha), rel=1e-5)
    # other alpha and temperature
    kl2 = sum(kl_by_hand(s[b, i].tolist(), t[b, i].tolist(), 2.0) for b, i, _ in tokens) / len(tokens)
    terms = clinkd_loss(s, logits["labels"], t, alpha=2.0, temperature=2.0)
    assert float(sum(terms.values())) == pytest.approx((2.0 * kl2 + ce) / 3.0, rel=1e-5)
    # no teacher: plain mean CE over answer tokens
    assert float(clinkd_loss(s, logits["labels"])["ce"]) == pytest.approx(ce, rel=1e-5)


def test_kd_sum_reduction_and_ignored_positions(logits) -> None:
    s, t, labels = logits["student"], logits["teacher"], logits["labels"]
    mean = clinkd_loss(s, labels, t, alpha=1.0, reduction="mean")
    total = clinkd_loss(s, labels, t, alpha=1.0, reduction="sum")
    assert float(total["kd"]) == pytest.approx(3 * float(mean["kd"]), rel=1e-5)  # three answer tokens
    assert float(total["ce"]) == pytest.approx(float(mean["ce"]), rel=1e-6)  # CE stays a mean
    # logits that predict ignored tokens (and the last position, which predicts nothing) do not matter
    s2, t2 = s.clone(), t.clone()
    s2[0, 0] += 5.0
    s2[1, :2] -= 3.0
    t2[:, 3] += 7.0
    changed = clinkd_loss(s2, labels, t2, alpha=1.0)
    assert all(torch.allclose(changed[k], mean[k]) for k in mean)
    # a sample of weight 0 drops out of both terms
    weighted = clinkd_loss(s, labels, t, alpha=1.0, weights=torch.tensor([1.0, 0.0]))
    alone = clinkd_loss(s[:1], labels[:1], t[:1], alpha=1.0)
    assert all(torch.allclose(weighted[k], alone[k]) for k in alone)


def test_teacher_vocabulary_is_cut_to_the_students(logits) -> None:
    s, t, labels = logits["student"], logits["teacher"], logits["labels"]
    wider = torch.cat([t, torch.full((2, 4, 4), 9.0)], dim=-1)  # extra rows (padding in Qwen2-VL-7B) are dropped
    assert torch.allclose(clinkd_loss(s, labels, wider)["kd"], clinkd_loss(s, labels, t)["kd"])
    with pytest.raises(ValueError, match="smaller than the student"):
        clinkd_loss(s, labels, t[..., :2])


def test_teacher_may_see_a_longer_sequence(logits) -> None:
    """A teacher with more image tokens: its answer tokens are matched by order, not by position."""
    s, t, labels = logits["student"], logits["teacher"], logits["labels"]
    t_long = torch.cat([torch.randn(2, 3, 3), t], dim=1)
    labels_long = torch.cat([torch.full((2, 3), IGNORE), labels], dim=1)
    expected = clinkd_loss(s, labels, t)
    shifted = clinkd_loss(s, labels, t_long, labels_long)
    assert all(torch.allclose(shifted[k], expected[k]) for k in expected)
    with pytest.raises(UsageError, match="different answer tokens"):
        clinkd_loss(s, labels, t, torch.tensor([[IGNORE, IGNORE, 2, 1], [IGNORE, IGNORE, IGNORE, 1]]))


def test_confidence_margin_is_top1_minus_top2_mean_over_answer_tokens() -> None:
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05]])
    logits = torch.zeros(3, 3, 3)
    logits[0, 0], logits[0, 1] = probabilities[0].log(), probabilities[1].log()
    logits[1, 1] = probabilities[2].log()
    labels = torch.tensor([[IGNORE, 1, 2], [IGNORE, IGNORE, 0], [IGNORE, IGNORE, IGNORE]])
    margins = confidence_margin(logits, labels)
    assert margins.tolist() == pytest.approx([(0.5 + 0.05) / 2, 0.85, 0.0], abs=1e-6)
    # the vocabulary is cut before the softmax: [0.7, 0.2] renormalised
    assert float(confidence_margin(logits, labels, vocabulary=2)[0]) == pytest.approx(
        (0.5 / 0.9 + 0.05 / 0.75) / 2, abs=1e-6)


def test_ordered_trainer_keeps_the_curriculum_order() -> None:
    trainer = OrderedTrainer.__new__(OrderedTrainer)  # only the ordering is under test
    trainer.order = [4, 0, 3, 1, 2]
    trainer.cfg = type("Cfg", (), {"batch_size": 2})()
    assert trainer.batches_of_epoch(0) == trainer.batches_of_epoch(5) == [[4, 0], [3, 1], [2]]


BOX = "<ref>mass</ref><box>(100,100),(300,300)</box>"


def test_flag_reasons() -> None:
    assert flag_reasons(BOX, BOX, 1.0) == []
    assert flag_reasons("<ref>mass</ref>", BOX, 0.9) == ["missing_box"]
    assert flag_reasons("<ref>mass</ref><box>(100,100),(300,9999)</box>", BOX, 0.9) == ["missing_box"]  # malformed
    # IoU exactly 0.5 is wrong (BiRD counts IoU > 0.5 as found)
    half = "<box>(100,100),(300,200)</box>"
    assert box_quality(half, BOX) == pytest.approx(0.5)
    assert flag_reasons(half, BOX, 0.9) == ["wrong_box"]
    assert flag_reasons("<box>(100,100),(300,290)</box>", BOX, 0.9) == []
    assert flag_reasons(BOX, BOX, 0.5, similarity_threshold=0.8) == ["low_similarity"]
    assert flag_reasons("kidney", "liver", 0.3) == ["low_similarity"]  # no box in the truth: text only
    # every truth box must be found
    two = BOX + "<box>(500,500),(700,700)</box>"
    assert flag_reasons(BOX, two, 0.9) == ["wrong_box"]
    assert box_quality(BOX, two) == pytest.approx(0.5)
    assert box_quality("liver", "liver") is None


def test_selection_keeps_the_best_by_similarity_plus_iou() -> None:
    candidates = ["<ref>mass</ref><box>(600,600),(800,800)</box>",  # right words, wrong box
                  "<ref>mass</ref><box>(110,100),(300,300)</box>",  # right words, right box
                  "<ref>mass</ref>"]  # no box
    best, score = select_candidate(candidates, BOX, [0.95, 0.9, 0.97])
    assert best == 1 and score == pytest.approx(0.9 + 0.95)
    assert candidate_score(candidates[0], BOX, 0.95) == pytest.approx(0.95)
    # text answers: similarity alone; ties keep the first
    assert select_candidate(["kidney", "kidneys", "liver"], "kidney", [0.8, 0.9, 0.9]) == (1, pytest.approx(0.9))
    with pytest.raises(ValueError):
        select_candidate([], BOX, [])


def sample(task: str, question: str, answer: str, image: str = "images/ct_1.png") -> Sample:
    return Sample(uid=f"{task}-{answer}", image=image, question=question, answer=answer, task=task, modality="ct")


def test_baselines_centre_box_mean_box_and_majority() -> None:
    vg = "Please output the bounding box of <ref>{}</ref> in this image."
    train = [sample("VG", vg.format("mass"), "<ref>mass</ref><box>(0,0),(200,200)</box>"),
             sample("VG", vg.format("mass"), "<ref>mass</ref><box>(100,100),(300,300)</box>"),
             sample("ROC", "What is the object in <box>(1,1),(5,5)</box>?", "mass"),
             sample("ROC", "What is the object in <box>(1,1),(5,5)</box>?", "Mass"),
             sample("ROC", "What is the object in <box>(1,1),(5,5)</box>?", "cyst")]
    test = [sample("VG", vg.format("mass"), "<ref>mass</ref><box>(50,50),(250,250)</box>"),  # the class's mean box
            sample("VG", vg.format("cyst"), "<ref>cyst</ref><box>(250,250),(750,750)</box>"),  # the centre box
            sample("ROC", "What is the object in <box>(1,1),(5,5)</box>?", "mass"),
            sample("ROC", "What is the object in <box>(1,1),(5,5)</box>?", "cyst")]
    result = baselines(train, test)
    assert result["VG"]["centre_box"]["overall"] == 0.5
    assert result["VG"]["mean_box"]["overall"] == 1.0  # unseen classes fall back to the centre box
    assert result["ROC"]["majority"]["answer"] == "mass" and result["ROC"]["majority"]["overall"] == 0.5


def test_stages_say_what_they_need() -> None:
    for stage, key in (("distill", "distill.teacher"), ("rct", "rct.init"), ("eval", "eval.checkpoint")):
        with pytest.raises(UsageError, match=key):
            validate(ClinKDConfig(stage=stage))
    with pytest.raises(UsageError, match="student_kd_rct but not student_kd"):
        validate(ClinKDConfig(models=["teacher", "student_kd_rct"]))
    with pytest.raises(UsageError, match="stage must be one of"):
        validate(ClinKDConfig(stage="pretrain"))


def test_recipes_load() -> None:
    root = Path(__file__).resolve().parents[2] / "configs" / "clinkd"
    for name in ("phantom-tiny.yaml", "qwen2vl-2b.yaml", "med-grit.yaml"):
        config = load_config(root / name)
        assert isinstance(config, ClinKDConfig)
        validate(config)


TINY_MODEL = {"vocab_size": 400, "hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "vision_depth": 1,
              "vision_embed": 32, "vision_heads": 2, "patch_size": 8, "min_pixels": 4096, "max_pixels": 4096}


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and two-thread OpenMP spinning on a busy 2-core machine is ~40x
    slower per operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_experiment_end_to_end_on_the_tiny_phantom(tiny_phantom, tmp_path, one_thread) -> None:
    from medistill.cli import main
    from medistill.methods.clinkd import load_grounder

    recipe = {
        "method": "clinkd",
        "data": {"root": str(tiny_phantom / "med-grit"), "max_train": 32, "max_val": 8, "max_test": 16},
        "student": TINY_MODEL, "teacher": {**TINY_MODEL, "hidden": 48, "heads": 4},
        "sft": {"epochs": 1}, "distill": {"epochs": 1, "curriculum": "order"},
        "rct": {"rounds": 1, "epochs": 1, "max_samples": 8, "candidates": 2, "similarity_threshold": 0.99},
        "eval": {"max_new_tokens": 12, "mia_max_new_tokens": 16, "meteor": False, "gallery": 2},
        "optim": {"lr": 0.003, "warmup_steps": 2}, "train": {"batch_size": 16, "eval_batch_size": 32}}
    path = tmp_path / "clinkd.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["experiment", "clinkd", "--config", str(path), "--out", str(out)]) == 0

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["order"] == ["teacher", "student_sft", "student_kd", "student_kd_rct"]
    for name in metrics["order"]:
        result = metrics["models"][name]
        assert set(result) >= {"VG", "ROC", "RC", "MIA"}
        assert 0 <= result["VG"]["mean"] <= 1 and 0 <= result["ROC"]["mean"] <= 1
        assert result["VG"]["per_modality"] and result["RC"]["notes"]  # METEOR off (or no pycocoevalcap): said
        loaded = load_grounder(out / name / "checkpoints")  # a Hugging Face directory with its tokenizer
        assert loaded.model.config.mcg_rope["inter_gap"] == [2, 2, 2]
    assert set(metrics["baselines"]) == {"VG", "ROC"}
    assert set(metrics["baselines"]["VG"]) == {"centre_box", "mean_box"}
    (round1,) = metrics["rct"]["student_kd_rct"]
    assert round1["checked"] == 8 and round1["flagged"] == round1["corrected"] + round1["fallback"] + round1["skipped"]
    corrections = json.loads((out / "student_kd_rct" / "round1" / "corrections.json").read_text(encoding="utf-8"))
    assert all(len(c["candidates"]) == 2 for c in corrections["corrections"])
    assert (out / "student_kd" / "margins.json").is_file()
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "baseline: centre box" in report and "Reflective correction rounds" in report
    assert report.count("data:image/png") == 8  # 2 VG examples x 4 models
    captions = json.loads((out / "gallery" / "captions.json").read_text(encoding="utf-8"))
    assert {c["model"] for c in captions} == set(metrics["order"])

    # `medistill eval` reads the grounding checkpoint with the same recipe
    assert main(["eval", str(out / "student_kd_rct" / "checkpoints"), "--config", str(path),
                 "--set", "eval.max_new_tokens=4", "--set", "eval.mia_max_new_tokens=4"]) == 0


def test_confidence_margin_matches_softmax_top_two() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE)
    labels[:, 2:] = 1
    top = F.softmax(logits[:, 1:4], dim=-1).topk(2, dim=-1).values
    expected = (top[..., 0] - top[..., 1]).mean(dim=1)
    assert torch.allclose(confidence_margin(logits, labels), expected, atol=1e-6)


def test_tied_weights_save_and_load(tmp_path) -> None:
    """Real Qwen2-VL-2B ties its input and output embeddings; the trainer's weight files must take that."""
    from safetensors.torch import load_file

    from medistill.engine.checkpoint import save_weights

    def tied() -> torch.nn.Sequential:
        module = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
        module[1].weight = module[0].weight
        return module

    torch.manual_seed(0)
    source = tied()
    save_weights(source, tmp_path / "w.safetensors")
    target = tied()
    target.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert torch.equal(target[0].weight, source[0].weight) and target[1].weight is target[0].weight


@pytest.mark.slow
def test_the_qwen2vl_2b_recipe_runs_with_a_local_checkpoint_directory(tiny_phantom, tmp_path, one_thread) -> None:
    """configs/clinkd/qwen2vl-2b.yaml's path (a pretrained directory with its own tokenizer, gradient
    checkpointing, stock-RoPE variant, RCT) on CPU, with a tiny saved Qwen2-VL standing in for the 2B."""
    from medistill.cli import main
    from medistill.methods.clinkd import (GroundingModelConfig, build_grounder, load_samples,
                                          train_grounding_tokenizer)

    root = Path(__file__).resolve().parents[2] / "configs" / "clinkd" / "qwen2vl-2b.yaml"
    data = [f"data.root={tiny_phantom / 'med-grit'}", "data.max_train=24", "data.max_val=8", "data.max_test=12"]
    samples = load_samples(load_config(root, data))["train"]
    stand_in = build_grounder(GroundingModelConfig(**TINY_MODEL), train_grounding_tokenizer(samples, 400), 0)
    stand_in.save(tmp_path / "qwen2vl-stand-in")
    loaded = build_grounder(GroundingModelConfig(pretrained=str(tmp_path / "qwen2vl-stand-in"),
                                                 gradient_checkpointing=True), None, 0)
    assert loaded.model.is_activation_checkpointing
    out = tmp_path / "run"
    overrides = [*data, f"student.pretrained={tmp_path / 'qwen2vl-stand-in'}", "student.dtype=null",
                 "student.min_pixels=4096", "student.max_pixels=4096", "train.device=cpu", "train.precision=fp32",
                 "train.batch_size=8", "optim.accumulate=1", "optim.warmup_steps=1", "sft.lr=0.001",
                 "rct.max_samples=6", "rct.candidates=2", "rct.lr=0.001", "eval.max_new_tokens=8",
                 "eval.mia_max_new_tokens=8", "eval.meteor=false", "eval.batch_size=16"]
    args = ["experiment", "clinkd", "--config", str(root), "--out", str(out)]
    assert main([*args, *[a for o in overrides for a in ("--set", o)]]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["order"] == ["student_sft", "student_sft_stock_rope", "student_sft_rct"]
    stock = json.loads((out / "student_sft_stock_rope" / "checkpoints" / "config.json").read_text(encoding="utf-8"))
    assert stock["mcg_rope"]["inter_gap"] == [1, 1, 1]
    assert all(0 <= metrics["models"][name]["VG"]["mean"] <= 1 for name in metrics["order"])
