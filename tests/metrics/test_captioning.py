"""Caption metrics (RC / MIA) through pycocoevalcap: per modality, then the plain mean over modalities."""

from __future__ import annotations

import pytest

from medistill.metrics.captioning import caption_metrics, clean

pytest.importorskip("pycocoevalcap")


def test_identical_captions_score_one_and_modalities_average_plainly() -> None:
    references = ["nodule in the left upper lobe, about 12 mm", "normal-appearing heart", "a cyst in the liver"]
    predictions = [references[0], references[1], "liver"]
    result = caption_metrics(predictions, references, ["ct", "ct", "mr"], meteor=False)
    ct, mr = result["per_modality"]["ct"], result["per_modality"]["mr"]
    assert ct["n"] == 2 and mr["n"] == 1
    assert ct["BLEU-1"] == pytest.approx(1.0) and ct["BLEU-4"] == pytest.approx(1.0)
    assert ct["ROUGE-L"] == pytest.approx(1.0) and ct["METEOR"] is None
    assert mr["ROUGE-L"] < 1.0
    assert result["mean"]["ROUGE-L"] == pytest.approx((ct["ROUGE-L"] + mr["ROUGE-L"]) / 2)
    five = [ct[name] for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L")]
    assert ct["mBMR"] == pytest.approx(sum(five) / 5)  # METEOR left out, and said so
    assert result["notes"]


def test_tags_and_boxes_are_not_scored() -> None:
    assert clean("<ref>mass</ref><box>(1,2),(3,4)</box> in the left breast") == "mass in the left breast"
    assert clean("<|object_ref_start|>mass<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|> <|im_end|>") == "mass"
    assert caption_metrics([], [], [], meteor=False)["n"] == 0
    with pytest.raises(ValueError):
        caption_metrics(["a"], [], [], meteor=False)
