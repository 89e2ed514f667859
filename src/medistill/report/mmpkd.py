"""The MMPKD experiment's report: teacher vs student vs distilled student, with chance levels and a gallery."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medistill.report.html import HtmlReport, format_value, summary_cell, write_section_report
from medistill.report.run import read_metrics

CLASSIFICATION = ("auroc", "accuracy")
LOCALIZATION = ("pointing_game", "mass_inside", "iou_top", "dice_top", "pixel_auroc")


def mmpkd_section(report: HtmlReport, run_dir: Path) -> None:
    metrics = read_metrics(run_dir)
    units = metrics["units"]
    report.text(f"Teacher: {metrics['teacher_kind']}. Labels: {', '.join(metrics['labels'])}. "
                f"{len(units)} run(s) (seeds x folds); cells are the mean with a 95% t-interval over runs "
                f"(no interval for a single run). Samples of the first run: {metrics['samples']}.")
    rows = [[f"classification {name}", *(summary_cell(metrics[m].get(name)) for m in ("teacher", "student", "student_kd")),
             "0.500" if name == "auroc" else "n/a"] for name in CLASSIFICATION]
    kinds = sorted({key.split("/")[0] for key in metrics["student"] if "/" in key and key.split("/")[1] in LOCALIZATION})
    for kind in kinds:
        for name in LOCALIZATION:
            chance = metrics["chance"].get(name)
            rows.append([f"{kind} map: {name}", "-", summary_cell(metrics["student"].get(f"{kind}/{name}")),
                         summary_cell(metrics["student_kd"].get(f"{kind}/{name}")), format_value(chance)])
    report.table(["metric", "teacher (privileged input)", "student (image only)", "student + KD", "chance"], rows)
    report.text("Localization is zero-shot: the students never saw a region, only image-level labels. Chance is "
                "what a map without information scores (area fraction for pointing and mass, random top-k for "
                "IoU/Dice, 0.5 for pixel AUROC).", note=True)
    gallery = run_dir / "gallery"
    if (gallery / "captions.json").is_file():
        captions = json.loads((gallery / "captions.json").read_text(encoding="utf-8"))
        items = [((gallery / f"{i:03d}.png").read_bytes(), caption) for i, caption in enumerate(captions)]
        report.text("Gallery (last run): the region of interest outlined, then each student's attention rollout.")
        report.gallery(items, columns=3)


def write_mmpkd_report(run_dir: str | Path) -> Path:
    return write_section_report(run_dir, "MMPKD experiment", mmpkd_section)


def markdown_table(metrics: dict[str, Any], kind: str = "rollout") -> str:
    """The experiment's main table as Markdown (docs/results.md is assembled from these)."""
    lines = ["| metric | teacher | student | student + KD | chance |", "|---|---|---|---|---|"]
    for name in CLASSIFICATION:
        cells = [summary_cell(metrics[m].get(name)) for m in ("teacher", "student", "student_kd")]
        lines.append(f"| {name} | {' | '.join(cells)} | {'0.500' if name == 'auroc' else 'n/a'} |")
    for name in LOCALIZATION:
        cells = [summary_cell(metrics[m].get(f"{kind}/{name}")) for m in ("student", "student_kd")]
        lines.append(f"| {kind}: {name} | - | {' | '.join(cells)} | {format_value(metrics['chance'].get(name))} |")
    return "\n".join(lines)
