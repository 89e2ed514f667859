from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medistill.data.records import Box, Record, Turn
from medistill.metrics.grounding import (
    centre_box,
    format_box,
    grounding_metrics,
    majority_answer,
    parse_boxes,
    roc_accuracy,
    roc_correct,
    vg_recall,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("<ref>liver</ref><box>(10,20),(300,400)</box>", [Box(10, 20, 300, 400)]),
    ("<|object_ref_start|>liver<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>", [Box(10, 20, 300, 400)]),
    ("<box>( 0 , 0 ) , ( 999 , 999 )</box>", [Box(0, 0, 999, 999)]),
    ("<box>(1.5,2),(3,4.25)</box>", [Box(1.5, 2, 3, 4.25)]),
    ("<box>(1,2),(3,4)</box> and <box>(5,6),(7,8)</box>", [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]),
    ("no box here", []),
    ("<box>(1,2),(3,4)", []),                         # unclosed tag: no box
    ("(1,2),(3,4)", []),                              # untagged corners are not read
    ("<box>(1,2),(3,4</box>", [None]),                # unbalanced brackets
    ("<box>((1,2),(3,4)</box>", [None]),
    ("<box>(1,2),(3,4))</box>", [None]),
    ("<box>(1,2),(1000,4)</box>", [None]),            # outside 0-999
    ("<box>(-1,2),(3,4)</box>", [None]),
    ("<box>(5,2),(3,4)</box>", [None]),               # x2 < x1
    ("<box>(1,6),(3,4)</box>", [None]),               # y2 < y1
    ("<box>(3,2),(3,4)</box>", [None]),               # empty
    ("<box>(a,2),(3,4)</box>", [None]),               # not a number
    ("<box>(1e2,2),(3,4)</box>", [None]),
    ("<box>(1,2),(3,4),(5,6)</box>", [None]),         # three corners
    ("<box>(1,2)</box>", [None]),
    ("<box></box>", [None]),
    ("<box><box>(1,2),(3,4)</box>", [None]),          # nested tags
    ("<box>(1,2),(3,4)<|box_end|> <box>(5,6),(7,8)</box>", [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]),
])
def test_parse_boxes(text, expected):
    assert parse_boxes(text) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<box>/()|_start end,0123456789.-x")), max_size=60))
def test_parse_boxes_never_raises_and_keeps_invariants(text):
    for box in parse_boxes(text):
        assert box is None or (0 <= box.x1 < box.x2 <= 999 and 0 <= box.y1 < box.y2 <= 999)


def test_format_box_round_trips():
    box = Box(12, 34, 560, 780)
    assert format_box(box) == "<box>(12,34),(560,780)</box>"
    assert format_box(box, qwen=True) == "<|box_start|>(12,34),(560,780)<|box_end|>"
    assert parse_boxes(format_box(box)) == parse_boxes(format_box(box, qwen=True)) == [box]


# --- VG recall ----------------------------------------------------------------------------------------------

REF = "<ref>lesion</ref><box>(100,100),(300,300)</box>"


def test_vg_recall_iou_threshold_is_strict():
    # (100,100)-(300,300) against (100,100)-(300,x): IoU = (x - 100) / 200
    half = "<box>(100,100),(300,200)</box>"     # IoU 0.5 exactly: not found
    more = "<box>(100,100),(300,202)</box>"     # IoU 0.51: found
    result = vg_recall([half, more], [REF, REF], ["ct_1", "ct_2"])
    assert result["per_modality"]["ct"] == {"recall": 0.5, "correct": 1, "n": 2}
    assert vg_recall([half], [REF], ["ct_1"], threshold=0.4)["overall"] == 1.0


def test_vg_recall_counts_ground_truth_boxes_and_any_prediction():
    two = REF + " and <box>(600,600),(900,900)</box>"
    answers = [
        "<box>(0,0),(50,50)</box><box>(605,600),(900,895)</box>",  # second truth found by the second guess
        "<box>(100,100),(300,300)</box>",                            # one guess for two truths: finds one
    ]
    result = vg_recall(answers, [two, two], ["mr_a", "mr_b"])
    assert result["per_modality"]["mr"] == {"recall": 0.5, "correct": 2, "n": 4}


def test_vg_malformed_and_missing_boxes_are_wrong_not_errors():
    answers = ["<box>(100,100),(300,300</box>", "<box>(300,100),(100,300)</box>", "the lesion", "<box>(100,100)",
               "<box>(100,100),(300,300)</box><box>(1,1),(2000,3)</box>"]
    result = vg_recall(answers, [REF] * 5, ["ct_1"] * 5)
    assert result["per_modality"]["ct"] == {"recall": 0.2, "correct": 1, "n": 5}
    assert result["malformed"] == 3 and result["no_box"] == 4


def test_vg_skips_references_without_a_box_and_means_over_modalities():
    answers = [REF, "x", REF, REF, "x", "anything"]
    references = [REF, REF, REF, REF, REF, "no box in this reference"]
    ids = ["ct_1", "ct_2", "x_ray_7", "fundus_3", "fundus_4", "ct_3"]
    result = vg_recall(answers, references, ids)
    assert result["skipped"] == 1
    assert {name: entry["recall"] for name, entry in result["per_modality"].items()} == {
        "ct": 0.5, "x_ray": 1.0, "fundus": 0.5}
    assert list(result["per_modality"]) == ["ct", "x_ray", "fundus"]  # Med-GRIT's order
    assert result["mean"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert result["overall"] == pytest.approx(3 / 5)
    assert (result["correct"], result["n"]) == (3, 5)


def test_vg_qwen_form_and_other_modalities():
    qwen = "<|box_start|>(100,100),(300,300)<|box_end|>"
    result = vg_recall([qwen, REF], [REF, qwen], ["mammo_1", "scan"])
    assert result["per_modality"] == {"mammo": {"recall": 1.0, "correct": 1, "n": 1},
                                      "unknown": {"recall": 1.0, "correct": 1, "n": 1}}


def test_vg_empty_and_mismatched_inputs():
    result = vg_recall([], [], [])
    assert result["mean"] is None and result["overall"] is None and result["per_modality"] == {}
    with pytest.raises(ValueError, match="one of each"):
        vg_recall(["a"], [REF], [])


# --- ROC accuracy -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prediction", "reference", "correct"), [
    ("Left kidney", "left kidney", True),
    ("the kidney on the left", "Left Kidney", True),       # word order and extra words do not matter
    ("left kidneys", "left kidney", True),                 # substring, as BiRD
    ("kidney", "left kidney", False),
    ("liver.", "liver", True),
    ("liver", "liver.", False),                            # punctuation stays part of the word
    ("<|object_ref_start|>liver<|object_ref_end|>", "<ref>liver</ref>", True),
    ("", "liver", False),
])
def test_roc_correct(prediction, reference, correct):
    assert roc_correct(prediction, reference) is correct


def test_roc_accuracy_per_modality_and_mean():
    predictions = ["liver", "spleen", "lesion", "optic disc", "optic cup"]
    references = ["liver", "liver", "lesion", "optic disc", "optic disc"]
    ids = ["ct_1", "ct_2", "dermoscopy_1", "fundus_1", "fundus_2"]
    result = roc_accuracy(predictions, references, ids)
    assert {name: entry["accuracy"] for name, entry in result["per_modality"].items()} == {
        "ct": 0.5, "dermoscopy": 1.0, "fundus": 0.5}
    assert result["mean"] == pytest.approx(2 / 3)
    assert result["overall"] == pytest.approx(3 / 5)


# --- records and baselines ----------------------------------------------------------------------------------

def grit(uid: str, image: str, task: str, answer: str) -> Record:
    return Record(uid=uid, image=f"/data/images/{image}.png", split="test", task=task,
                  conversations=[Turn("question", answer)])


def test_grounding_metrics_from_records():
    records = [grit("1", "ct_1", "VG", REF), grit("2", "mr_1", "ROC", "liver"), grit("3", "ct_2", "MIA", "text"),
               grit("4", "mr_2", "ROC", "spleen")]
    result = grounding_metrics([REF, "the liver", "whatever", "kidney"], records)
    assert result["VG"]["per_modality"] == {"ct": {"recall": 1.0, "correct": 1, "n": 1}}
    assert result["ROC"]["per_modality"] == {"mr": {"accuracy": 0.5, "correct": 1, "n": 2}}
    with pytest.raises(ValueError, match="one per record"):
        grounding_metrics([], records)
    two_turns = Record(uid="x", image="ct_1.png", task="VG", conversations=[Turn("q", REF)] * 2)
    with pytest.raises(ValueError, match="record x"):
        grounding_metrics([REF], [two_turns])


@pytest.mark.parametrize(("fraction", "expected"), [
    (0.25, Box(250, 250, 750, 750)),
    (1.0, Box(0, 0, 999, 999)),
    (0.01, Box(450, 450, 550, 550)),
])
def test_centre_box(fraction, expected):
    assert centre_box(fraction) == expected
    assert centre_box(fraction).area == pytest.approx(fraction * 1000 ** 2, rel=0.01)


def test_centre_box_baseline_through_vg_recall():
    central = "<box>(300,300),(700,700)</box>"   # IoU with the 0.25 box: 0.64
    corner = "<box>(0,0),(200,200)</box>"
    answers = [format_box(centre_box())] * 2
    assert vg_recall(answers, [central, corner], ["ct_1", "ct_2"])["overall"] == 0.5
    with pytest.raises(ValueError, match="fraction"):
        centre_box(0)


def test_majority_answer():
    assert majority_answer(["Liver", "spleen", "liver ", "Spleen", "kidney"]) == "liver"  # tie: first seen
    assert majority_answer(["a  b", "A b", "c"]) == "a b"
    with pytest.raises(ValueError, match="no answers"):
        majority_answer([])
