from __future__ import annotations

import pytest

from medistill.data.records import Record
from medistill.metrics.vqa import VQAAccuracy, accepted_answers, normalize_answer, question_types, vqa_accuracy


def vqa(uid: str, answer: str, answer_type: str, question_type: str | None = None, **meta) -> Record:
    return Record(uid=uid, image=None, split="test", question="q?", answer=answer, answer_type=answer_type,
                  question_type=question_type, meta=meta)


@pytest.mark.parametrize(("text", "expected"), [
    ("Yes", "yes"),
    ("  yes  ", "yes"),
    ("On the right  shoulder.", "on the right shoulder"),
    ("left\tlung\n", "left lung"),
    ("etc..", "etc."),          # one final period only
    ("yes .", "yes"),
    ("3.5", "3.5"),             # inner periods stay
    ("x-ray, PA", "x-ray, pa"),  # punctuation other than a final period stays
    ("the liver", "the liver"),  # no article stripping
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_accepted_answers_use_hash_alternatives():
    record = vqa("vqa-med-2019/test/x/1", "CT", "OPEN", "modality", answers=["CT", "ct w/ contrast ", "ct"])
    assert accepted_answers(record) == ["ct", "ct w/ contrast"]
    assert accepted_answers(vqa("a", "Yes.", "CLOSED")) == ["yes"]
    with pytest.raises(ValueError, match="no answer"):
        accepted_answers(Record(uid="b", image=None))


def test_open_closed_overall_arithmetic():
    records = [
        vqa("1", "yes", "CLOSED", "PRES"),
        vqa("2", "no", "CLOSED", "PRES"),
        vqa("3", "left", "CLOSED", "POS"),   # a closed question whose answer is not yes / no
        vqa("4", "liver", "OPEN", "ORGAN"),
        vqa("5", "CT", "OPEN", "MODALITY"),
    ]
    predictions = ["Yes", "yes", "Left.", "liver", "mri"]
    result = vqa_accuracy(predictions, records)
    assert result["overall"] == {"accuracy": 3 / 5, "correct": 3, "n": 5}
    assert result["closed"] == {"accuracy": 2 / 3, "correct": 2, "n": 3}
    assert result["open"] == {"accuracy": 1 / 2, "correct": 1, "n": 2}
    # the released code's rule: closed = answer is yes / no, so "left" counts as open there
    convention = result["yes_no_convention"]
    assert convention["closed"] == {"accuracy": 1 / 2, "correct": 1, "n": 2}
    assert convention["open"] == {"accuracy": 2 / 3, "correct": 2, "n": 3}
    assert convention["overall"] == result["overall"]
    assert "per_category" not in result


def test_yes_no_convention_also_moves_open_yes_answers():
    records = [vqa("1", "Yes", "OPEN"), vqa("2", "no", "OPEN")]
    result = vqa_accuracy(["yes", "yes"], records)
    assert result["open"]["n"] == 2 and result["closed"] == {"accuracy": None, "correct": 0, "n": 0}
    assert result["yes_no_convention"]["closed"]["n"] == 2 and result["yes_no_convention"]["open"]["n"] == 0


def test_compound_question_types_count_toward_each_part():
    records = [vqa("1", "yes", "CLOSED", "PRES, POS"), vqa("2", "no", "CLOSED", "PRES"),
               vqa("3", "x", "OPEN", "POS,POS"), vqa("4", "y", "OPEN", None)]
    assert question_types(records[0]) == ["PRES", "POS"] and question_types(records[2]) == ["POS"]
    table = vqa_accuracy(["yes", "yes", "x", "z"], records)["per_question_type"]
    assert table == {
        "(none)": {"accuracy": 0.0, "correct": 0, "n": 1},
        "POS": {"accuracy": 1.0, "correct": 2, "n": 2},
        "PRES": {"accuracy": 0.5, "correct": 1, "n": 2},
    }


def test_vqa_med_2019_per_category_and_alternatives():
    records = [
        vqa("vqa-med-2019/test/f/1", "ct", "OPEN", "modality", answers=["ct", "ct w contrast"]),
        vqa("vqa-med-2019/test/f/2", "axial", "OPEN", "plane", answers=["axial"]),
        vqa("vqa-med-2019/test/f/3", "yes", "CLOSED", "abnormality", answers=["yes"]),
        vqa("vqa-med-2019/test/f/4", "skull and contents", "OPEN", "organ", answers=["skull and contents"]),
    ]
    result = vqa_accuracy(["CT w contrast", "sagittal", "yes", "skull and contents"], records)
    categories = result["per_category"]
    assert list(categories) == ["modality", "plane", "organ", "abnormality", "overall"]
    assert categories["modality"]["accuracy"] == 1.0  # the second alternative counts
    assert categories["plane"]["accuracy"] == 0.0
    assert categories["overall"] == {"accuracy": 0.75, "correct": 3, "n": 4}


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        vqa_accuracy(["a", "b"], [vqa("1", "a", "OPEN")])


def test_unknown_answer_type_is_refused():
    with pytest.raises(ValueError, match="answer_type"):
        vqa_accuracy(["a"], [vqa("1", "a", None)])


def test_metric_object_accumulates_and_resets():
    metric = VQAAccuracy()
    metric.update(["yes"], [vqa("1", "yes", "CLOSED")])
    metric.update(["no", "liver"], [vqa("2", "yes", "CLOSED"), vqa("3", "liver", "OPEN")])
    assert metric.aggregate()["overall"] == {"accuracy": 2 / 3, "correct": 2, "n": 3}
    metric.reset()
    assert metric.aggregate()["overall"]["n"] == 0
