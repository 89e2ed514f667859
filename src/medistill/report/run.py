"""The report of a run directory, and its sections that the demo report reuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medistill.config import ClassifierConfig, load_config
from medistill.data.datasets import ImageLabelDataset
from medistill.engine.checkpoint import read_checkpoint
from medistill.engine.logging import JsonlLog
from medistill.errors import UsageError
from medistill.data.regions import load_mask
from medistill.explain.overlay import PALETTE, outline, png_bytes, to_rgb
from medistill.report.html import HtmlReport
from medistill.report.plots import training_curves
from medistill.engine.distributed import main_only


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no metrics.json: the run has not finished (resume it with medistill train --resume)")
    return json.loads(path.read_text(encoding="utf-8"))


def classifier_section(report: HtmlReport, run_dir: Path, config: ClassifierConfig, examples: int = 8) -> None:
    """Per-label test table, training curves, and test images with their true regions outlined."""
    from medistill.methods.classifier import build_datasets, predict
    from medistill.models.vit import vit_from_architecture

    metrics = read_metrics(run_dir)
    test, prevalence = metrics.get("test", {}), metrics["prevalence"].get("test", {})
    report.text(f"Image-only ViT ({config.model.name}, {config.data.image_size} px, {metrics['precision']}) "
                f"trained on {metrics['samples']['train']} images, selected on {metrics['samples']['val']}, "
                f"tested on {metrics['samples']['test']}.")
    rows = [[name, prevalence.get(name), test.get(f"auroc/{name}"), test.get(f"accuracy/{name}")]
            for name in metrics["labels"]]
    rows.append(["macro mean", None, test.get("auroc"), test.get("accuracy")])
    report.table(["label", "test prevalence", "test AUROC", "test accuracy"], rows)
    report.text("AUROC 0.5 is chance. Accuracy at threshold 0.5 is dominated by the majority class; "
                "read it against the prevalence.", note=True)
    report.image(training_curves(JsonlLog(run_dir / "log.jsonl").read(), "auroc"), "training curves")
    weights, checkpoint = read_checkpoint(run_dir / "checkpoints")
    model = vit_from_architecture(checkpoint["architecture"])
    model.load_state_dict(weights)
    model.eval()
    dataset = build_datasets(config)["test"]
    report.gallery(example_gallery(dataset, predict(model, dataset, 64), examples))


def example_gallery(dataset: ImageLabelDataset, probabilities: np.ndarray, count: int) -> list[tuple[bytes, str]]:
    """Test images with findings first, each region outlined in its label's colour, with the predictions."""
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset.records[i].regions))[:count]
    items = []
    for index in order:
        record = dataset.records[index]
        image = dataset.images[index].numpy().astype(np.float32) / 255.0
        rgb = to_rgb(image)
        for region in record.regions:
            if region.mask and region.label in dataset.label_names:
                color = PALETTE[dataset.label_names.index(region.label) % len(PALETTE)]
                rgb = outline(rgb, load_mask(region.mask, image.shape), color)
        truth = ", ".join(sorted({r.label for r in record.regions})) or "no finding"
        top = sorted(zip(dataset.label_names, probabilities[index]), key=lambda pair: -pair[1])[:3]
        predicted = ", ".join(f"{name} {p:.2f}" for name, p in top)
        items.append((png_bytes(rgb, scale=max(1, 220 // image.shape[0])), f"truth: {truth} | predicted: {predicted}"))
    return items


@main_only
def write_run_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    if config.method == "mmpkd":
        from medistill.report.mmpkd import write_mmpkd_report

        return write_mmpkd_report(run_dir)
    if config.method == "amif":
        from medistill.report.amif import write_amif_report

        return write_amif_report(run_dir)
    report = HtmlReport(f"medistill run: {run_dir.name}")
    if isinstance(config, ClassifierConfig):
        classifier_section(report, run_dir, config)
    else:
        report.code(json.dumps(read_metrics(run_dir), indent=2, sort_keys=True))
    return report.write(run_dir / "report.html")
