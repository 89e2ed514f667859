from __future__ import annotations

import json
from pathlib import Path

import pytest

from medistill.cli import main


@pytest.mark.slow
def test_demo_at_tiny_scale_writes_report_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--cases", "30", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and str(out / "metrics.json") in printed
    served = [line.split("medistill serve ")[1] for line in printed.splitlines() if "medistill serve " in line]
    assert len(served) == 3 and all((Path(path) / "config.json").is_file() for path in served)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["phantom"]["cases_per_modality"] == 30
    assert set(metrics["phantom"]["counts"]) == {"cxr", "mammo", "ct", "mr"}
    for model in ("teacher", "student", "student_kd"):
        assert "auroc" in metrics["mmpkd_cxr"][model]
    assert set(metrics["amif_phantom"]) == {"full", "question_only"}
    assert 0.0 <= metrics["amif_phantom"]["full"]["overall"] <= 1.0
    grounding = metrics["clinkd_phantom"]
    assert set(grounding["models"]) == {"student_sft"}
    assert {"VG/recall", "ROC/accuracy"} <= set(grounding["models"]["student_sft"])
    assert {"centre_box", "mean_box"} <= set(grounding["baselines"]["VG"])
    page = (out / "report.html").read_text()
    assert "The phantom world" in page and "MMPKD" in page and page.count("<img") >= 6
    assert "AMiF" in page and "question_only" in page
    assert "ClinKD" in page and "centre box" in page
    # a second run reuses the phantom set instead of generating it again
    manifest = (out / "data" / "manifest.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--cases", "30", "--epochs", "1"]) == 0
    assert (out / "data" / "manifest.json").stat().st_mtime_ns == manifest
