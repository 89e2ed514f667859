"""The ClinKD report: per task, every model beside the baselines (VG recall@0.5 and ROC accuracy per modality,
RC / MIA caption scores), the RCT round counts, and VG test images with the true and predicted boxes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medistill.report.html import HtmlReport, write_section_report
from medistill.report.run import read_metrics

CAPTION_COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "mBMR")
MODEL_NAMES = {"teacher": "teacher (larger model, SFT)", "student_sft": "student, SFT",
               "student_sft_stock_rope": "student, SFT, stock M-RoPE", "student_sft_rct": "student, SFT + RCT",
               "student_kd": "student, KD", "student_kd_rct": "student, KD + RCT", "student_rct": "student + RCT",
               "checkpoint": "checkpoint"}
BASELINE_NAMES = {"centre_box": "baseline: centre box (25% of the image)",
                  "mean_box": "baseline: mean training box of the class", "majority": "baseline: majority answer"}


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _modalities(entries: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for entry in entries:
        seen.update(dict.fromkeys(entry.get("per_modality", {})))
    return list(seen)


def _order(metrics: dict[str, Any]) -> list[str]:
    """Models in the order they were trained (metrics.json sorts its keys)."""
    return [name for name in metrics.get("order", []) if name in metrics["models"]] or list(metrics["models"])


def _score_table(report: HtmlReport, metrics: dict[str, Any], task: str, score: str) -> None:
    rows_in = [(MODEL_NAMES.get(name, name), metrics["models"][name][task]) for name in _order(metrics)
               if task in metrics["models"][name]]
    rows_in += [(BASELINE_NAMES.get(name, name), entry) for name, entry in metrics["baselines"].get(task, {}).items()]
    if not rows_in:
        return
    modalities = _modalities([entry for _, entry in rows_in])
    rows = []
    for name, entry in rows_in:
        per = entry.get("per_modality", {})
        rows.append([name, *(_pct(per.get(m, {}).get(score)) for m in modalities), _pct(entry.get("mean")),
                     _pct(entry.get("overall")), entry.get("n")])
    report.table(["model", *modalities, "mean over modalities", "pooled", "n"], rows)


def _caption_table(report: HtmlReport, metrics: dict[str, Any], task: str) -> None:
    models = metrics["models"]
    rows = [[MODEL_NAMES.get(name, name), *(_pct(models[name][task]["mean"].get(c)) for c in CAPTION_COLUMNS),
             models[name][task].get("n")] for name in _order(metrics) if task in models[name]]
    if rows:
        report.table(["model", *CAPTION_COLUMNS, "n"], rows)


def clinkd_section(report: HtmlReport, run_dir: Path) -> None:
    metrics = read_metrics(run_dir)
    counts = "; ".join(f"{split} {n} (" + ", ".join(f"{task} {k}" for task, k in metrics["tasks"][split].items()) + ")"
                       for split, n in metrics["samples"].items())
    report.text(f"Samples (question-answer turns): {counts}. Evaluated on "
                f"the {metrics['split']} split with greedy decoding. Scores in %, per modality (the image file "
                "name's prefix), then the plain mean over modalities (BiRD's protocol) and the pooled score.")
    report.heading("VG: recall at IoU > 0.5")
    _score_table(report, metrics, "VG", "recall")
    report.heading("ROC: accuracy (every word of the true name in the answer)")
    _score_table(report, metrics, "ROC", "accuracy")
    for task, title in (("RC", "RC: referring captioning"), ("MIA", "MIA: medical image analysis")):
        report.heading(f"{title} (pycocoevalcap, means over modalities, x100)")
        _caption_table(report, metrics, task)
    for note in metrics.get("caption_notes", []):
        report.text(note, note=True)
    for name, rounds in metrics.get("rct", {}).items():
        report.heading(f"Reflective correction rounds: {MODEL_NAMES.get(name, name)}")
        columns = ["round", "checked", "flagged", "missing_box", "wrong_box", "low_similarity", "corrected",
                   "fallback", "skipped", "trained_on"]
        report.table(columns, [[entry.get(c) for c in columns] for entry in rounds])
        report.text("Flagged: a truth box without a predicted box of IoU > 0.5, or MiniLM similarity to the truth "
                    "below the threshold. Corrected: the best sampled candidate of the corrector (which sees the "
                    "truth) passes both checks; fallback: none did, and the ground truth is used instead.", note=True)
    seconds = metrics.get("seconds", {})
    report.text("Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), note=True)
    captions_file = run_dir / "gallery" / "captions.json"
    if captions_file.is_file():
        captions = json.loads(captions_file.read_text(encoding="utf-8"))
        models = [m for m in _order(metrics) if any(c["model"] == m for c in captions)]
        if captions:
            report.heading("VG test examples: truth in green, prediction in red (one column per model)")
            per_model = {m: [c for c in captions if c["model"] == m] for m in models}
            items = []
            for index in range(max(len(v) for v in per_model.values())):
                for model in models:
                    if index < len(per_model[model]):
                        c = per_model[model][index]
                        iou = "IoU n/a" if c["iou"] is None else f"IoU {c['iou']:.2f}"
                        items.append(((run_dir / "gallery" / c["file"]).read_bytes(),
                                      f"{MODEL_NAMES.get(model, model)} | {c['question']} | {c['prediction']} | {iou}"))
            report.gallery(items, columns=len(models))


def write_clinkd_report(run_dir: str | Path) -> Path:
    return write_section_report(run_dir, "ClinKD grounding", clinkd_section)
