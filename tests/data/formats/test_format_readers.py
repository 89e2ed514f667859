"""Each reader on a fixture written in its release's layout, with the release's quirks."""

from __future__ import annotations

import json
import math
import pickle

import pytest
from format_layouts import WRITERS, grey, mimic_cxr, pathvqa, vqa_rad_mevf

from medistill.data.formats import FORMATS, open_dataset
from medistill.errors import DataError, UsageError


def read(name, root, **options):
    reader = open_dataset(name, root, **options)
    return list(reader.records()), reader


def by_uid(records):
    return {record.uid: record for record in records}


def test_every_format_is_registered():
    assert set(WRITERS) <= set(FORMATS)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_fixture_reads_without_problems(tmp_path, name):
    records, reader = read(name, WRITERS[name](tmp_path / name))
    assert records and not reader.problems
    assert all(record.image and record.split in ("train", "val", "test") for record in records)


def test_unknown_format_and_option_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="known formats"):
        open_dataset("dicomdir", tmp_path)
    with pytest.raises(UsageError, match="uncertain"):
        list(open_dataset("mimic-cxr", mimic_cxr(tmp_path), uncertain="maybe").records())


def test_vqa_rad_quirks(tmp_path):
    records, _ = read("vqa-rad", WRITERS["vqa-rad"](tmp_path))
    first, compound, count, *_ = records
    assert first.uid == "vqa-rad/0" and first.split == "train"
    assert compound.answer_type == "CLOSED" and compound.question_type == "PRES, POS"
    assert count.answer == "2"
    assert [record.split for record in records] == ["train"] * 4 + ["test"] * 2
    assert records[-1].question_type == "OTHER"


def test_vqa_rad_mevf_layout(tmp_path):
    records, reader = read("vqa-rad", vqa_rad_mevf(tmp_path))
    assert [(r.split, r.answer) for r in records] == [("train", "no"), ("test", "brain")]
    assert reader.referenced_image_dir() == tmp_path / "images"


def test_mini_mias_rows_circles_and_origin(tmp_path):
    records = by_uid(read("mini-mias", WRITERS["mini-mias"](tmp_path))[0])
    assert len(records) == 7
    assert [region.circle.cy for region in records["mdb005"].regions] == [1024 - 133, 1024 - 168]
    assert records["mdb005"].meta["source_rows"] == 2
    assert records["mdb003"].labels == {"abnormal": 0.0, "malignant": pytest.approx(math.nan, nan_ok=True)}
    assert records["mdb059"].regions[0].circle is None  # no coordinates
    assert records["mdb216"].regions[0].attributes["note"] == "*NOTE 3*"
    assert records["mdb023"].labels["malignant"] == 1.0
    assert records["mdb001"].image.endswith(".pgm") and records["mdb002"].image.endswith(".png")
    assert records["mdb001"].patient_id == records["mdb002"].patient_id


def test_nih_harmonises_infiltrate_and_parses_split_headers(tmp_path):
    records = by_uid(read("nih-cxr", WRITERS["nih-cxr"](tmp_path))[0])
    first = records["00000001_000"]
    assert first.labels["Infiltration"] == 1.0 and first.labels["Effusion"] == 1.0
    assert [region.label for region in first.regions] == ["Infiltration", "Effusion"]
    box = first.regions[0].box
    assert (box.x1, box.y1) == pytest.approx((225.08, 547.01)) and box.x2 == pytest.approx(225.08 + 86.77)
    assert not any(records["00000002_000"].labels.values())
    assert records["00000002_000"].table["age"] == 61


def test_mimic_labels_reports_splits_and_boxes(tmp_path):
    records = by_uid(read("mimic-cxr", WRITERS["mimic-cxr"](tmp_path))[0])
    a = records["dicom-a"]
    assert a.labels["Atelectasis"] == 1.0 and a.labels["Consolidation"] == 0.0
    assert math.isnan(a.labels["Cardiomegaly"]) and math.isnan(a.labels["Edema"])  # blank, uncertain
    assert a.report == "FINDINGS: There is a small left pleural effusion. No pneumothorax.\n" \
                       "IMPRESSION: Small left effusion."
    assert records["dicom-c"].split == "val" and a.study_id == "50000001" and a.patient_id == "10000032"
    assert a.regions[0].box.x2 == 12 and a.image_size == (32, 32)
    ones = by_uid(read("mimic-cxr", tmp_path, uncertain="ones")[0])
    zeros = by_uid(read("mimic-cxr", tmp_path, uncertain="zeros")[0])
    assert ones["dicom-a"].labels["Edema"] == 1.0 and zeros["dicom-a"].labels["Edema"] == 0.0


def test_mimic_accepts_png_images(tmp_path):
    records, _ = read("mimic-cxr", mimic_cxr(tmp_path, suffix=".png"))
    assert all(record.image.endswith(".png") for record in records)


def test_cbis_ddsm_headers_paths_and_tcia_layout(tmp_path):
    records = by_uid(read("cbis-ddsm", WRITERS["cbis-ddsm"](tmp_path))[0])
    mass = records["Mass-Training_P_00001_LEFT_CC_2"]
    assert mass.labels == {"malignant": 1.0} and mass.table["breast_density"] == 3.0
    assert mass.regions[0].mask.endswith("000001.dcm") and mass.split == "train"
    calc = records["Calc-Test_P_00038_RIGHT_MLO_1"]
    assert calc.labels == {"malignant": 0.0} and calc.table["calc_type"] == "PLEOMORPHIC"
    assert calc.meta["pathology"] == "BENIGN_WITHOUT_CALLBACK" and calc.table["breast_density"] == 3.0
    tcia = records["Mass-Test_P_00016_LEFT_CC_1"]
    assert "full mammogram images" in tcia.image and "ROI mask images" in tcia.regions[0].mask


def test_med_grit_forms_tasks_boxes_and_modality(tmp_path):
    records, _ = read("med-grit", WRITERS["med-grit"](tmp_path))
    bird = [record for record in records if record.split == "test"]
    assert [record.task for record in bird] == ["VG", "ROC", "RC", "MIA"]
    box = bird[0].regions[0].box  # 200 x 100 image, 0-1000 grid
    assert bird[0].regions[0].label == "liver" and (box.x1, box.y1, box.x2, box.y2) == (20, 20, 100, 60)
    assert bird[0].conversations[0].question == "Where is <ref>liver</ref>?"
    llava = next(record for record in records if record.meta["id"] == "x_ray_0002")
    assert llava.modality == "x_ray" and llava.task == "VG" and llava.regions[0].label == "nodule"
    assert "<box>" in llava.conversations[0].answer and llava.split == "train"
    assert len({record.uid for record in records}) == len(records)


def test_slake_language_and_regions(tmp_path):
    WRITERS["slake"](tmp_path)
    english, _ = read("slake", tmp_path)
    both, _ = read("slake", tmp_path, q_lang="all")
    assert len(english) == 3 and len(both) == 4
    first = english[0]
    assert {region.label for region in first.regions} == {"segmentation", "Liver"}
    assert first.regions[1].box.x2 == 30 and english[1].split == "val"


@pytest.mark.parametrize("form", ["pkl", "json"])
def test_pathvqa_pickle_and_json(tmp_path, form):
    records, _ = read("pathvqa", pathvqa(tmp_path, form))
    assert [(r.split, r.answer_type) for r in records] == [("train", "CLOSED"), ("train", "OPEN"), ("test", "CLOSED")]
    assert records[0].image.endswith("images/train/train_0001.jpg")


def test_pathvqa_refuses_pickles_that_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "qas" / "train"
    folder.mkdir(parents=True)
    (folder / "train_qa.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        read("pathvqa", tmp_path)


def test_vqa_med_2019_categories_and_alternatives(tmp_path):
    records, _ = read("vqa-med-2019", WRITERS["vqa-med-2019"](tmp_path))
    train = [record for record in records if record.split == "train"]
    assert [record.question_type for record in train] == ["modality", "plane", "abnormality"]
    test = [record for record in records if record.split == "test"]
    assert test[0].answer == "ct noncontrast" and test[0].meta["answers"] == ["ct noncontrast", "ct without contrast"]
    assert all(record.image.endswith(".jpg") and "synpic" in record.image for record in records)


# --- bad input: a DataError naming file, record and field; with on_error='skip' listed, never dropped ---

def _vqa_rad_items(root):
    path = root / "VQA_RAD Dataset Public.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(("change", "field"), [
    (lambda item: item.pop("question"), "question"),
    (lambda item: item.update(question="   "), "question"),
    (lambda item: item.update(answer=["yes"]), "answer"),
    (lambda item: item.update(phrase_type="holdout"), "phrase_type"),
    (lambda item: item.update(image_name="../../etc/passwd"), "image_name"),
])
def test_vqa_rad_bad_record_names_file_record_field(tmp_path, change, field):
    path, items = _vqa_rad_items(WRITERS["vqa-rad"](tmp_path))
    change(items[2])
    path.write_text(json.dumps(items))
    with pytest.raises(DataError) as raised:
        read("vqa-rad", tmp_path)
    assert (raised.value.file, raised.value.record, raised.value.field) == (str(path), 3, field)
    records, reader = read("vqa-rad", tmp_path, on_error="skip")
    assert len(records) == len(items) - 1
    assert [(p.file, p.record) for p in reader.problems] == [(str(path), 3)]


def test_short_csv_row_and_bad_boxes(tmp_path):
    root = WRITERS["nih-cxr"](tmp_path)
    boxes = root / "BBox_List_2017.csv"
    boxes.write_text(boxes.read_text() + "00000003_001.png,Mass,10,10\r\n"
                     "00000003_001.png,Nodule,900,10,200,10\r\n00000003_001.png,Mass,50,50,-5,10\r\n")
    with pytest.raises(DataError) as raised:
        read("nih-cxr", root)
    assert raised.value.record == 5 and raised.value.field == "w" and "short row" in raised.value.message
    records, reader = read("nih-cxr", root, on_error="skip")
    messages = [p.message for p in reader.problems]
    assert len(messages) == 3 and "outside the 1024x1024 image" in messages[1] and "inverted" in messages[2]
    # an image with a bad box is skipped whole rather than read with half its boxes
    assert sorted(record.uid for record in records) == ["00000001_000", "00000002_000"]


def test_med_grit_box_errors(tmp_path):
    root = WRITERS["med-grit"](tmp_path)
    (root / "test.json").write_text(json.dumps([{"id": "ct_0001", "conversations": [
        ["Where is <ref>liver</ref>?", "<box>(500,200),(100,600)</box>"]]}]))
    with pytest.raises(DataError, match="inverted") as raised:
        read("med-grit", root)
    assert raised.value.field == "answer" and raised.value.record == 1


def test_missing_annotation_file_is_a_data_error(tmp_path):
    grey(tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match="file not found"):
        read("nih-cxr", tmp_path)
