"""`medistill demo`: phantom data, every method pipeline at demo scale, one report a person can read."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from medistill.config import from_dict, read_yaml
from medistill.data.formats import open_dataset
from medistill.data.imaging import load_image
from medistill.engine.logging import write_json
from medistill.engine.rundir import RunDir, prepare_output_dir
from medistill.data.regions import load_mask
from medistill.explain.overlay import PALETTE, outline, png_bytes, to_rgb
from medistill.errors import UsageError
from medistill.report.html import HtmlReport

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
DEMO_IMAGE_SIZE = 128  # phantom pixels; the demo models work at 64 px


def demo_config(name: str, data_root: Path, seed: int, epochs: int | None) -> Any:
    """A demo recipe from configs/demo/ with the demo's data root, seed and (optionally) epochs."""
    from medistill.config import schema_for

    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"{path} is missing: run the demo from a source checkout of medistill")
    data = read_yaml(path)
    config = from_dict(schema_for(data), data)
    config.data.root = str(data_root / config.data.root)  # demo recipes name roots inside the phantom set
    for source in getattr(getattr(config, "pretrain", None), "pairs", []) + \
            getattr(getattr(config, "pretrain", None), "images", []):
        source.root = str(data_root / source.root)
    if hasattr(config, "seeds"):
        config.seeds = [seed]
    config.train.seed = seed
    if epochs is not None:
        config.train.epochs = epochs
    return config


def ensure_phantom(root: Path, cases: int, seed: int) -> dict[str, Any]:
    """Generate the demo's phantom set, or reuse it when an identical one is already there."""
    from medistill.data.phantom import MODALITIES, PhantomKnobs, write_phantom

    knobs = PhantomKnobs(image_size=DEMO_IMAGE_SIZE)
    manifest = root / "manifest.json"
    if manifest.is_file():
        existing = json.loads(manifest.read_text(encoding="utf-8"))
        same_knobs = existing.get("knobs") == json.loads(json.dumps(vars(knobs)))
        if existing.get("seed") == seed and existing.get("cases_per_modality") == cases and same_knobs:
            log.info("reusing the phantom set in %s", root)
            return existing
    log.info("generating %d phantom cases per modality in %s", cases, root)
    write_phantom(root, cases=cases, seed=seed, modalities=MODALITIES, knobs=knobs, overwrite=True, progress=True)
    return json.loads(manifest.read_text(encoding="utf-8"))


def phantom_section(report: HtmlReport, root: Path) -> None:
    """One example of every modality with its findings outlined and its report, to show what the data is."""
    shown: dict[str, Any] = {}
    for record in open_dataset("phantom", root, task="labels").records():
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
        items.append((png_bytes(rgb, scale=2), f"{modality}: {findings}"))
    report.gallery(items)
    report.text("Outlines are the exact lesion masks; at the default subtlety the lesions are faint on purpose "
                "(docs/phantom.md). The report of the chest X-ray above, which only the teacher reads:", note=True)
    if "cxr" in shown:
        report.code(shown["cxr"].report or "")


def _run_recipe(name: str, out: Path, seed: int, epochs: int | None) -> dict[str, Any]:
    """Run configs/demo/NAME.yaml into a fresh OUT/NAME and return its metrics."""
    from medistill.methods import RUNNERS

    run_path = out / name
    shutil.rmtree(run_path, ignore_errors=True)
    config = demo_config(name, out / "data", seed, epochs)
    run = RunDir(prepare_output_dir(run_path))
    run.write_config(config)
    return RUNNERS[config.method](config, run, False)


def run_demo(out: str | Path, *, cases: int, seed: int, epochs: int | None) -> dict[str, Any]:
    from medistill.report.amif import amif_section
    from medistill.report.clinkd import clinkd_section
    from medistill.report.mmpkd import mmpkd_section

    started = time.perf_counter()
    out = prepare_output_dir(out, resume=True)
    phantom = ensure_phantom(out / "data", cases, seed)
    report = HtmlReport("medistill demo")
    report.heading("The phantom world")
    phantom_section(report, out / "data")

    log.info("MMPKD on phantom chest X-rays: report teacher, image-only student, distilled student")
    mmpkd = _run_recipe("mmpkd-cxr", out, seed, epochs)
    report.heading("Privileged-modality distillation (MMPKD), phantom chest X-ray")
    report.text("The student without distillation is the image-only classifier every method is compared with.")
    mmpkd_section(report, out / "mmpkd-cxr")

    log.info("AMiF on phantom VQA: pretraining, then the full model and the question-only baseline")
    vqa = _run_recipe("amif-phantom", out, seed, epochs)
    report.heading("Med-VQA with aligned pretraining and gated fusion (AMiF), phantom VQA")
    report.text("The question-only baseline shows how much the answers can be guessed without the image.")
    amif_section(report, out / "amif-phantom")

    log.info("ClinKD on the phantom's grounding set: a tiny Qwen2-VL with MCG-RoPE")
    grounding = _run_recipe("clinkd-phantom", out, seed, epochs)
    report.heading("Medical grounding with a tiny Qwen2-VL and MCG-RoPE (ClinKD), phantom Med-GRIT")
    report.text("The baselines answer without looking: the centre box, the mean training box of the named class, "
                "the majority answer.")
    clinkd_section(report, out / "clinkd-phantom")

    seconds = time.perf_counter() - started
    report.text(f"Demo wall time: {seconds:.0f} s. Re-create with: medistill demo --out {out} --cases {cases} "
                f"--seed {seed}" + (f" --epochs {epochs}" if epochs else ""), note=True)
    report_path = report.write(out / "report.html")
    metrics = {
        "seconds": seconds,
        "phantom": {"cases_per_modality": phantom["cases_per_modality"], "counts": phantom["counts"]},
        "mmpkd_cxr": {model: {name: mmpkd[model][name]["mean"] for name in mmpkd[model]}
                      for model in ("teacher", "student", "student_kd")} | {"chance": mmpkd["chance"]},
        "amif_phantom": {name: {group: variant["summary"][group]["mean"] for group in ("open", "closed", "overall")}
                         for name, variant in vqa["variants"].items()},
        "clinkd_phantom": {"models": grounding["summary"],
                           "baselines": {task: {name: entry["mean"] for name, entry in by_task.items()}
                                         for task, by_task in grounding["baselines"].items()}},
    }
    write_json(out / "metrics.json", metrics)
    return {"seconds": seconds, "report": report_path, "metrics": out / "metrics.json"}
