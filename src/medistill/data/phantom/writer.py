"""Write a phantom world to disk: every public layout plus the phantom's own index, all or nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medistill.data.phantom.case import generate_case
from medistill.data.phantom.knobs import PhantomKnobs
from medistill.data.phantom.layouts import CbisDdsm, Files, MedGrit, MimicCxr, VqaRad, native_entry, png_bytes
from medistill.data.phantom.spec import MODALITIES, SPECS
from medistill.errors import UsageError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
LAYOUTS = {"cxr": MimicCxr, "mammo": CbisDdsm}


def _check(out: Path, cases: int, modalities: Sequence[str], knobs: PhantomKnobs, overwrite: bool) -> None:
    if isinstance(cases, bool) or not isinstance(cases, int) or cases <= 0:
        raise UsageError(f"cases must be a positive whole number of cases per modality, not {cases!r}")
    if isinstance(modalities, str):
        raise UsageError(f"modalities must be a list of names, not the string {modalities!r}")
    unknown = [m for m in modalities if m not in SPECS]
    if unknown or not modalities:
        raise UsageError(f"unknown phantom modality {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from: {', '.join(MODALITIES)}")
    if len(set(modalities)) != len(modalities):
        raise UsageError(f"modalities repeat a name: {', '.join(modalities)}; give each once")
    if not isinstance(knobs, PhantomKnobs):
        raise UsageError(f"knobs must be a PhantomKnobs, not {type(knobs).__name__}")
    knobs.validate()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder: choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} is not empty: choose an empty or new folder, or pass overwrite=True to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"the parent folder {parent} does not exist: create it first or choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in {parent}: choose an output folder where you have write permission")


def write_phantom(
    out: str | Path,
    *,
    cases: int,
    seed: int,
    modalities: Sequence[str] = MODALITIES,
    knobs: PhantomKnobs = PhantomKnobs(),
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate `cases` cases per modality into `out`; the same arguments give byte-identical files.

    Everything is written into a hidden sibling folder first and renamed into place at the end, so
    an error leaves nothing behind. Returns a summary: counts per modality and split, and paths.
    """
    out = Path(out).absolute()
    modalities = list(modalities)
    _check(out, cases, modalities, knobs, overwrite)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
    except OSError as error:  # os.access can say yes where the file system says no (/proc, read-only mounts)
        raise UsageError(f"cannot write in {out.parent} ({error.strerror}): choose another output folder") from None
    try:
        summary = _write_all(staging, cases, seed, modalities, knobs, progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["root"] = str(out)
    summary["paths"] = {name: str(out / name) for name in summary["paths"]}
    log.info("wrote the phantom world (%d cases per modality, seed %d) to %s", cases, seed, out)
    return summary


def _write_all(root: Path, cases: int, seed: int, modalities: list[str], knobs: PhantomKnobs,
               progress: bool) -> dict[str, Any]:
    files = Files(root)
    own = {m: LAYOUTS[m](files) for m in modalities if m in LAYOUTS}  # one modality's own release
    shared = [VqaRad(files, seed), MedGrit(files)]
    counts: dict[str, Counter[str]] = {m: Counter() for m in modalities}
    findings: dict[str, Counter[str]] = {m: Counter() for m in modalities}
    lines = []
    jobs = [(m, i) for m in modalities for i in range(cases)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="phantom", unit="case")
    for modality, index in jobs:
        case = generate_case(seed, index, modality, knobs)
        image = png_bytes(case.image)
        paths: dict[str, str] = {}
        for layout in ([own[modality]] if modality in own else []) + shared:
            paths.update(layout.add(case, image))
        lines.append(json.dumps(native_entry(case, files, image, paths), sort_keys=True, ensure_ascii=False))
        counts[modality][case.split] += 1
        findings[modality].update(f.label for f in case.findings)
    for layout in [*own.values(), *shared]:
        layout.finish()
    files.write("cases.jsonl", "\n".join(lines) + "\n")
    folders = sorted(layout.name for layout in [*own.values(), *shared])
    manifest = {
        "generator": "medistill.data.phantom",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "cases_per_modality": cases,
        "modalities": modalities,
        "knobs": asdict(knobs),
        "counts": {m: dict(sorted(counts[m].items())) for m in modalities},
        "findings": {m: dict(sorted(findings[m].items())) for m in modalities},
        "layouts": folders,
        "index": "cases.jsonl",
    }
    files.json("manifest.json", manifest)
    return {**manifest, "paths": ["cases.jsonl", "manifest.json", *folders]}
