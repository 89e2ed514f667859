from __future__ import annotations

import json

import pytest

from medistill.data.records import Record
from medistill.errors import ConfigError, DataError, UsageError
from medistill.metrics.vqa import accepted_answers
from medistill.models.vqa import AnswerVocabulary


def vqa(uid: str, answer: str, split: str = "train", answer_type: str = "OPEN", **meta) -> Record:
    return Record(uid=uid, image=None, split=split, question="q?", answer=answer, answer_type=answer_type,
                  meta=meta)


@pytest.fixture
def vocabulary() -> AnswerVocabulary:
    answers = ["Yes", "no", "yes.", "Liver", "lung", "No ", "yes"]
    return AnswerVocabulary.from_records([vqa(str(i), answer) for i, answer in enumerate(answers)])


def test_normalised_and_ordered_by_frequency_then_alphabet(vocabulary):
    assert vocabulary.answers == ("yes", "no", "liver", "lung")
    assert vocabulary.counts == (3, 2, 1, 1)
    assert vocabulary.index("LIVER.") == 2 and vocabulary.index("kidney") is None
    assert vocabulary.answer(0) == "yes" and vocabulary.count("No") == 2 and vocabulary.count("x") == 0
    assert "Lung" in vocabulary and len(vocabulary) == 4


@pytest.mark.parametrize("split", ["test", "val"])
def test_refuses_anything_but_training_records(split):
    records = [vqa("a", "yes"), vqa("b", "secret", split=split)]
    with pytest.raises(UsageError, match="training records only.*first: b"):
        AnswerVocabulary.from_records(records)
    with pytest.raises(UsageError, match="no training records"):
        AnswerVocabulary.from_records([])


def test_save_load_roundtrip(tmp_path, vocabulary):
    path = tmp_path / "answers.json"
    vocabulary.save(path)
    loaded = AnswerVocabulary.load(path)
    assert loaded.answers == vocabulary.answers and loaded.counts == vocabulary.counts
    assert loaded.fingerprint == vocabulary.fingerprint
    loaded.check_matches(vocabulary.fingerprint)


def test_fingerprint_depends_on_answers_and_order(vocabulary):
    assert AnswerVocabulary(["yes", "no"], [1, 1]).fingerprint != AnswerVocabulary(["no", "yes"], [1, 1]).fingerprint
    assert AnswerVocabulary(list(vocabulary.answers), [9, 9, 9, 9]).fingerprint == vocabulary.fingerprint


def test_fingerprint_mismatch_says_what_to_do(tmp_path, vocabulary):
    path = tmp_path / "answers.json"
    AnswerVocabulary(["yes", "no", "kidney"], [1, 1, 1]).save(path)
    with pytest.raises(ConfigError, match=rf"{path.name}.*does not match the checkpoint.*{vocabulary.fingerprint}"
                                          r".*use the vocabulary file saved with that checkpoint"):
        AnswerVocabulary.load(path).check_matches(vocabulary.fingerprint)


def test_bad_vocabulary_files(tmp_path, vocabulary):
    with pytest.raises(UsageError, match="does not exist"):
        AnswerVocabulary.load(tmp_path / "missing.json")
    path = tmp_path / "answers.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a readable JSON"):
        AnswerVocabulary.load(path)
    vocabulary.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["answers"][0] = "maybe"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match="file was edited"):
        AnswerVocabulary.load(path)


def test_out_of_vocabulary_share_and_alternatives(vocabulary):
    test = [
        vqa("1", "yes", "test", "CLOSED"),
        vqa("2", "kidney", "test", "OPEN"),
        vqa("3", "brain", "test", "OPEN", answers=["brain", "Lung"]),  # an alternative is in the vocabulary
        vqa("4", "Kidney.", "test", "OPEN"),
    ]
    report = vocabulary.out_of_vocabulary(test)
    assert report["overall"] == {"n": 4, "oov": 2, "share": 0.5}
    assert report["open"] == {"n": 3, "oov": 2, "share": 2 / 3}
    assert report["closed"] == {"n": 1, "oov": 0, "share": 0.0}
    assert report["answers"] == {"kidney": 2}
    assert vocabulary.target(test[2]) == vocabulary.index("lung")


@pytest.mark.realdata
def test_vqa_rad_vocabulary_from_train_only(shared_data, tmp_path):
    from medistill.data.formats import open_dataset

    root = shared_data / "vqa_rad"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    records = list(open_dataset("vqa-rad", root).records())
    train = [record for record in records if record.split == "train"]
    test = [record for record in records if record.split == "test"]
    assert (len(train), len(test)) == (1797, 451)
    with pytest.raises(UsageError):
        AnswerVocabulary.from_records(records)

    vocabulary = AnswerVocabulary.from_records(train)
    train_answers = {accepted_answers(record)[0] for record in train}
    test_only = {accepted_answers(record)[0] for record in test} - train_answers
    assert set(vocabulary.answers) == train_answers and sum(vocabulary.counts) == 1797
    assert test_only and not test_only & set(vocabulary.answers)
    assert vocabulary.answers[:2] == ("no", "yes")

    report = vocabulary.out_of_vocabulary(test)
    assert report["overall"]["n"] == 451 and report["overall"]["oov"] == sum(report["answers"].values())
    assert set(report["answers"]) == test_only
    assert report["closed"]["oov"] <= report["open"]["oov"]
    print(f"VQA-RAD: {len(vocabulary)} train answers; test out of vocabulary "
          + ", ".join(f"{k} {v['oov']}/{v['n']} = {v['share']:.1%}" for k, v in report.items() if k != "answers"))

    vocabulary.save(tmp_path / "answers.json")
    AnswerVocabulary.load(tmp_path / "answers.json").check_matches(vocabulary.fingerprint)
