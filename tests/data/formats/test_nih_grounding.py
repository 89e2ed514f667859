"""NIH ChestX-ray14 boxes as Med-GRIT visual-grounding conversations for ClinKD."""

from __future__ import annotations

import pytest
from format_layouts import nih_cxr

from medistill.data.formats import open_dataset
from medistill.metrics.grounding import parse_boxes


def test_each_boxed_finding_becomes_one_vg_conversation(tmp_path):
    records = {r.uid: r for r in open_dataset("nih-cxr", nih_cxr(tmp_path), task="grounding").records()}
    assert sorted(records) == ["00000001_000/vg/Effusion", "00000001_000/vg/Infiltration", "00000003_001/vg/Mass"]
    effusion = records["00000001_000/vg/Effusion"]
    (turn,) = effusion.conversations
    assert effusion.task == "VG" and effusion.modality == "x_ray" and effusion.patient_id == "1"
    assert turn.question == "Please locate the effusion in the image."
    # 686.1, 131.5, 185.4 x 313.4 px of a 1024 px image on the 0-1000 grid
    assert turn.answer == "<ref>effusion</ref><box>(670,128),(851,434)</box>"
    (box,) = parse_boxes(turn.answer)
    assert box is not None and (box.x1, box.y2) == (670, 434)
    assert [r.label for r in effusion.regions] == ["Effusion"]


def test_grounding_records_feed_clinkd_with_the_x_ray_modality(tmp_path):
    from medistill.methods.clinkd import ClinKDConfig, load_samples

    config = ClinKDConfig()
    config.data.format, config.data.root = "nih-cxr", str(nih_cxr(tmp_path))
    config.data.options, config.data.val_fraction = {"task": "grounding"}, 0.0
    (sample, *_) = load_samples(config)["train"]
    assert sample.modality == "x_ray" and sample.image_id.startswith("x_ray_0000000")


def test_the_real_nih_subset_gives_vg_conversations(shared_data):
    records = list(open_dataset("nih-cxr", shared_data / "nih_cxr_bbox", task="grounding").records())
    assert records and all(r.task == "VG" and r.conversations[0].question.startswith("Please locate the ")
                           for r in records)
    assert all(len(parse_boxes(r.conversations[0].answer)) == len(r.regions) for r in records)


@pytest.mark.parametrize("item, message", [
    ({"conversations": [["<image> Please locate the mass.", "<ref>mass</ref><box>(1,2),(30,40)</box>"]]},
     "without an image"),
    ({"id": "ct_1", "conversations": [["<image><image> Please locate the mass.", "<ref>mass</ref>"]]},
     "2 image tokens but one image"),
])
def test_med_grit_conversations_without_an_image_or_with_extra_image_tokens_are_named(tmp_path, item, message):
    import json

    from medistill.errors import DataError

    (tmp_path / "images").mkdir()
    (tmp_path / "train.json").write_text(json.dumps([item]))
    with pytest.raises(DataError, match=message) as error:
        list(open_dataset("med-grit", tmp_path).records())
    assert "train.json" in str(error.value) and "1" in str(error.value)
