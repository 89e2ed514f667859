"""`medistill demo`: phantom data, every method pipeline at demo scale, one report a person can read."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from medistill.config import ClassifierConfig, from_dict, read_yaml
from medistill.data.formats import open_dataset
from medistill.engine.logging import write_json
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.explain.overlay import PALETTE, load_mask, outline, png_bytes, to_rgb
from medistill.data.imaging import load_image
from medistill.report.html import HtmlReport
from medistill.report.run import classifier_section

log = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "demo" / "classifier.yaml"


def demo_classifier_config(data_root: Path, seed: int, epochs: int) -> ClassifierConfig:
    """The demo recipe (configs/demo/classifier.yaml when present, else the same values built in)."""
    data = read_yaml(RECIPE) if RECIPE.is_file() else {"method": "classifier"}
    config = from_dict(ClassifierConfig, data)
    config.data.root = str(data_root)
    config.data.format = "phantom"
    config.data.modality = "cxr"
    config.train.seed = seed
    config.train.epochs = epochs
    return config


def ensure_phantom(root: Path, cases: int, seed: int) -> dict[str, Any]:
    """Generate the demo's phantom set, or reuse it when an identical one is already there."""
    from medistill.data.phantom import MODALITIES, write_phantom

    manifest = root / "manifest.json"
    if manifest.is_file():
        existing = json.loads(manifest.read_text(encoding="utf-8"))
        if existing.get("seed") == seed and existing.get("cases_per_modality") == cases:
            log.info("reusing the phantom set in %s", root)
            return existing
    log.info("generating %d phantom cases per modality in %s", cases, root)
    write_phantom(root, cases=cases, seed=seed, modalities=MODALITIES, overwrite=True, progress=True)
    return json.loads(manifest.read_text(encoding="utf-8"))


def phantom_section(report: HtmlReport, root: Path) -> None:
    """One example of every modality with its findings outlined and its report, to show what the data is."""
    records = list(open_dataset("phantom", root, task="labels").records())
    shown: dict[str, Any] = {}
    for record in records:
        if record.modality not in shown and record.regions and record.image:
            shown[record.modality] = record
    items = []
    for modality, record in sorted(shown.items()):
        image = load_image(record.image)
        rgb = to_rgb(image)
        for k, region in enumerate(record.regions):
            if region.mask:
                rgb = outline(rgb, load_mask(region.mask, image.shape), PALETTE[k % len(PALETTE)])
        findings = ", ".join(r.label for r in record.regions)
        items.append((png_bytes(rgb), f"{modality}: {findings}"))
    report.gallery(items)
    report.text("Outlines are the exact lesion masks; at the default subtlety the lesions are faint on purpose "
                "(docs/phantom.md). Example report of the first case:", note=True)
    first = next(iter(shown.values()), None)
    if first is not None:
        report.code(first.report or "")


def run_demo(out: str | Path, *, cases: int, seed: int, epochs: int) -> dict[str, Any]:
    started = time.perf_counter()
    out = prepare_output_dir(out, resume=True)
    phantom = ensure_phantom(out / "data", cases, seed)
    report = HtmlReport("medistill demo")
    report.heading("The phantom world")
    phantom_section(report, out / "data")

    from medistill.methods import RUNNERS

    run_path = out / "classifier"
    shutil.rmtree(run_path, ignore_errors=True)
    config = demo_classifier_config(out / "data", seed, epochs)
    run = RunDir(prepare_output_dir(run_path))
    run.write_config(config)
    log.info("training the image-only classifier on phantom chest X-rays")
    classifier = RUNNERS["classifier"](config, run, False)
    report.heading("Image-only classifier (phantom chest X-ray)")
    classifier_section(report, run_path, config)

    seconds = time.perf_counter() - started
    report.text(f"Demo wall time: {seconds:.0f} s. Re-create with: medistill demo --out {out} --cases {cases} "
                f"--seed {seed} --epochs {epochs}", note=True)
    report_path = report.write(out / "report.html")
    metrics = {"seconds": seconds, "phantom": phantom, "classifier": {"test": classifier["test"],
                                                                     "samples": classifier["samples"]}}
    write_json(out / "metrics.json", metrics)
    return {"seconds": seconds, "report": report_path, "metrics": out / "metrics.json",
            "auroc": float(np.nan_to_num(classifier["test"].get("auroc", float("nan"))))}
