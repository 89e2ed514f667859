"""The `image-text` reader on tiny fixtures in each real layout: ROCO (Kaggle CSVs and the GitHub text
files), MedICaT, generic CSV / TSV / JSONL / JSON, and every error with its file, record and field."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medistill.cli import main
from medistill.data.checks import check_dataset
from medistill.data.formats import FORMATS, open_dataset
from medistill.errors import DataError, UsageError

MEDICAT_FILE = "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"


def png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, items: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def read(root: Path, **options):
    reader = open_dataset("image-text", root, **options)
    return list(reader.records()), reader


def roco(root: Path) -> Path:
    """The Kaggle packaging: data/{split}/{subset}/{subset}{split}data.csv (id,name,caption) + images/."""
    layout = [("train", "radiology", "radiologytraindata.csv", ["ROCO_00002", "ROCO_00003"]),
              ("train", "non-radiology", "nonradiologytraindata.csv", ["ROCO_10001"]),
              ("validation", "radiology", "radiologyvaldata.csv", ["ROCO_00020"]),
              ("test", "radiology", "radiologytestdata.csv", ["ROCO_00001"])]
    for folder, subset, name, ids in layout:
        directory = root / "data" / folder / subset
        rows = []
        for roco_id in ids:
            image = f"PMC{roco_id[-4:]}_fig-{roco_id[-1]}.jpg"
            png(directory / "images" / image)
            rows.append([roco_id, image, f' Axial CT of {roco_id}, "arrow" marks the lesion.\n'])
        write_csv(directory / name, ["id", "name", "caption"], rows)
    return root


def roco_github(root: Path) -> Path:
    """The GitHub release: captions.txt + dlinks.txt (and a cc_*.csv licence list); fetch.py's image names."""
    directory = root / "data" / "validation" / "radiology"
    directory.mkdir(parents=True)
    (directory / "captions.txt").write_text(
        "ROCO_00020\t Axial CT of the pelvis.\nROCO_00027\t Postoperative radiograph of the pelvis.\n")
    (directory / "dlinks.txt").write_text(
        "ROCO_00020\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/1e/ed/PMC3970251.tar.gz -P /dir"
        "\tCRIONM2014-931546.003.jpg\n"
        "ROCO_00027\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/d9/4e/PMC2766744.tar.gz -P /dir"
        "\tcios-1-176-g005.jpg\n")
    write_csv(directory / "cc_tp_val.csv", ["ROCO_ID", "PMC_ID", "CC"], [["ROCO_00020", "x.jpg", "CC BY"]])
    png(directory / "images" / "PMC3970251_CRIONM2014-931546.003.jpg")
    png(directory / "images" / "PMC2766744_cios-1-176-g005.jpg")
    return root


def medicat(root: Path) -> Path:
    """release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl + release/figures/, and the
    subcaption file beside it (not a caption file)."""
    release = root / "release"
    items = [
        {"pdf_hash": "26491ab7", "fig_key": "Figure4", "fig_uri": "3-Figure4-1.png",
         "s2_caption": "Figure 4. MRI of the occipital lesion.", "s2orc_caption": None,
         "s2orc_references": ["Imaging showed a lesion (Figure 4)."], "radiology": True},
        {"pdf_hash": "57c9ad0f", "fig_key": "Figure1", "fig_uri": "2-Figure1-1.png",
         "s2_caption": "Figure 1. Endoscopic image of the stricture.", "s2orc_references": None,
         "radiology": False},
    ]
    write_jsonl(release / MEDICAT_FILE, items)
    write_jsonl(release / "subcaptions_public.jsonl", [{"pdf_hash": "26491ab7", "subcaptions": {}}])
    for item in items:
        png(release / "figures" / f"{item['pdf_hash']}_{item['fig_uri']}")
    return root


def mimic_form(root: Path) -> Path:
    """A MIMIC-CXR report-form CSV: two views of one study, a split column, images under images/."""
    for name in ("a.png", "b.png", "c.png"):
        png(root / "images" / "files" / name)
    write_csv(root / "reports.csv",
              ["dicom_id", "path", "study_id", "subject_id", "Split", "findings", "impression", "report"],
              [["d1", "files/a.png", "s1", "p1", "train", "Small effusion.", "Effusion.", "FINDINGS: Small..."],
               ["d2", "files/b.png", "s1", "p1", "train", "Small effusion.", "Effusion.", "FINDINGS: Small..."],
               ["d3", "files/c", "s2", "p2", "validate", "", "Clear lungs.", "IMPRESSION: Clear lungs."]])
    return root


def test_registered_and_opened_by_name(tmp_path):
    assert "image-text" in FORMATS
    with pytest.raises(UsageError, match="unknown option.*text_colum"):
        open_dataset("image-text", mimic_form(tmp_path), text_colum="report")
    with pytest.raises(UsageError, match="subset"):
        read(tmp_path, subset="ct")


def test_roco_csv_layout_splits_subsets_and_captions(tmp_path):
    records, reader = read(roco(tmp_path))
    assert not reader.problems
    by_uid = {record.uid: record for record in records}
    assert {uid: r.split for uid, r in by_uid.items()} == {
        "ROCO_00002": "train", "ROCO_00003": "train", "ROCO_10001": "train", "ROCO_00020": "val",
        "ROCO_00001": "test"}
    first = by_uid["ROCO_00002"]
    assert first.report == 'Axial CT of ROCO_00002, "arrow" marks the lesion.'  # stripped, quotes kept
    assert first.image == str(tmp_path / "data/train/radiology/images/PMC0002_fig-2.jpg")
    assert first.meta == {"caption_source": "caption", "subset": "radiology"}
    assert by_uid["ROCO_10001"].meta["subset"] == "non-radiology"
    radiology, _ = read(tmp_path, subset="radiology")
    assert len(radiology) == 4 and all(r.meta["subset"] == "radiology" for r in radiology)
    # one ROCO CSV given directly keeps its folder's split
    single, _ = read(tmp_path / "data/test/radiology/radiologytestdata.csv")
    assert [(r.uid, r.split) for r in single] == [("ROCO_00001", "test")]


def test_roco_github_layout(tmp_path):
    records, reader = read(roco_github(tmp_path))
    assert not reader.problems
    assert [(r.uid, r.split, r.report) for r in records] == [
        ("ROCO_00020", "val", "Axial CT of the pelvis."),
        ("ROCO_00027", "val", "Postoperative radiograph of the pelvis.")]
    assert records[0].image.endswith("images/PMC3970251_CRIONM2014-931546.003.jpg")
    direct, _ = read(tmp_path / "data/validation/radiology/captions.txt")  # the caption file given directly
    assert [(r.uid, r.split) for r in direct] == [("ROCO_00020", "val"), ("ROCO_00027", "val")]
    with pytest.raises(DataError, match="expected a .csv"):
        read(tmp_path / "data/validation/radiology/dlinks.txt")
    (tmp_path / "data/validation/radiology/dlinks.txt").write_text("ROCO_00020\tno archive here\tx.jpg\n")
    records, reader = read(tmp_path, on_error="skip")
    assert [(Path(p.file).name, p.record, p.message.split(":")[0]) for p in reader.problems] == [
        ("dlinks.txt", 1, "field 'dlinks'"), ("captions.txt", 1, "field 'id'"), ("captions.txt", 2, "field 'id'")]


def test_medicat_layout_references_and_radiology_subset(tmp_path):
    records, reader = read(medicat(tmp_path))
    assert not reader.problems and len(records) == 2
    first = records[0]
    assert first.uid == "26491ab7_3-Figure4-1.png" and first.split == "train"
    assert first.image == str(tmp_path / "release/figures/26491ab7_3-Figure4-1.png")
    assert first.report == "Figure 4. MRI of the occipital lesion."
    assert first.meta == {"caption_source": "s2_caption", "references": ["Imaging showed a lesion (Figure 4)."],
                          "radiology": True}
    assert "references" not in records[1].meta
    assert [r.uid for r in read(tmp_path, subset="radiology")[0]] == ["26491ab7_3-Figure4-1.png"]
    assert [r.uid for r in read(tmp_path, subset="non-radiology")[0]] == ["57c9ad0f_2-Figure1-1.png"]
    assert open_dataset("image-text", tmp_path).referenced_image_dir() == tmp_path / "release" / "figures"
    # the release file is MedICaT by its name even when its first record is broken
    path = tmp_path / "release" / MEDICAT_FILE
    path.write_text('{"fig_uri": "x.png", "s2_caption": "no hash"}\n' + path.read_text())
    records, reader = read(tmp_path, on_error="skip")
    assert len(records) == 2
    assert [(p.record, p.message) for p in reader.problems] == [(1, "field 'pdf_hash': empty value")]


def test_generic_csv_report_form_with_study_patient_split_and_sections(tmp_path):
    records, reader = read(mimic_form(tmp_path))
    assert not reader.problems
    assert [(r.uid, r.split, r.study_id, r.patient_id) for r in records] == [
        ("d1", "train", "s1", "p1"), ("d2", "train", "s1", "p1"), ("d3", "val", "s2", "p2")]
    assert records[0].report == "FINDINGS: Small..." and records[0].meta["caption_source"] == "report"
    assert records[0].meta["findings"] == "Small effusion." and records[0].meta["impression"] == "Effusion."
    assert "findings" not in records[2].meta
    assert records[0].image == str(tmp_path / "images/files/a.png")  # the images/ subfolder
    assert records[2].image.endswith("c.png")  # a name without suffix finds the file
    overridden, _ = read(tmp_path, text_column="Impression", id_column="path", study_column="subject_id",
                         patient_column="dicom_id")
    assert [(r.uid, r.report, r.study_id, r.patient_id) for r in overridden][0] == (
        "files/a.png", "Effusion.", "p1", "d1")
    assert overridden[0].meta["caption_source"] == "impression"


def test_generic_jsonl_file_auto_columns_and_overrides(tmp_path):
    png(tmp_path / "scans" / "x1.png")
    png(tmp_path / "scans" / "x2.png")
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image_path": "scans/x1.png", "text": "Chest film.", "alt": "A", "file": "scans/x2.png"},
        {"image_path": "scans/x2.png", "text": "Knee film.", "alt": "B", "file": "scans/x1.png"}])
    records, _ = read(path)
    assert [(r.uid, r.report, Path(r.image).name, r.split) for r in records] == [
        ("pairs/1", "Chest film.", "x1.png", "train"), ("pairs/2", "Knee film.", "x2.png", "train")]
    records, _ = read(path, image_column="file", text_column="alt")
    assert [(r.report, Path(r.image).name, r.meta["caption_source"]) for r in records] == [
        ("A", "x2.png", "alt"), ("B", "x1.png", "alt")]


def test_folder_of_files_split_by_name_tsv_json_and_image_root(tmp_path):
    images = tmp_path / "elsewhere"
    for name in ("a.png", "b.png", "c.png"):
        png(images / name)
    data = tmp_path / "data"
    write_csv(data / "captions_train.tsv", ["filename", "caption"], [["a.png", "tab\tfree caption, with comma"]],
              delimiter="\t")
    write_jsonl(data / "captions_val.jsonl", [{"image": "b.png", "caption": "val caption"}])
    (data / "captions_test.json").write_text(json.dumps([{"image": "c.png", "caption": "test caption"}]))
    (data / "notes.txt").write_text("not a caption file")
    records, reader = read(data, image_root=str(images))
    assert [(r.split, r.report) for r in records] == [
        ("test", "test caption"), ("train", "tab\tfree caption, with comma"), ("val", "val caption")]
    assert reader.referenced_image_dir() is None  # image_root: no 'never referenced' listing
    with pytest.raises(UsageError, match="image_root"):
        open_dataset("image-text", data, image_root=str(tmp_path / "missing"))


def test_missing_column_names_file_record_and_field(tmp_path):
    png(tmp_path / "a.png")
    path = write_csv(tmp_path / "pairs.csv", ["image", "label"], [["a.png", "x"]])
    with pytest.raises(DataError, match="no caption column") as error:
        read(path)
    assert (error.value.file, error.value.record, error.value.field) == (str(path), 1, "caption")
    with pytest.raises(DataError, match="text_column") as error:
        read(path, text_column="impression")
    assert (error.value.record, error.value.field) == (1, "impression")
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [{"caption": "x"}])
    with pytest.raises(DataError, match="no image column") as error:
        read(jsonl)
    assert (error.value.file, error.value.record, error.value.field) == (str(jsonl), 1, "image")


def test_empty_caption_missing_image_and_bad_split(tmp_path):
    png(tmp_path / "a.png")
    path = write_csv(tmp_path / "pairs.csv", ["image", "caption", "split"], [
        ["a.png", "fine", "train"],
        ["a.png", "  ", "train"],
        ["gone.png", "no image", "test"],
        ["a.png", "odd split", "holdout"],
        ["/etc/passwd", "outside", "train"],
        ["x" * 5000, "name too long for the file system", "train"]])
    with pytest.raises(DataError, match="empty caption") as error:
        read(path)
    assert (error.value.file, error.value.record, error.value.field) == (str(path), 3, "caption")
    records, reader = read(path, on_error="skip")
    assert [r.report for r in records] == ["fine"]
    assert [(p.record, p.message.split(":")[0]) for p in reader.problems] == [
        (3, "field 'caption'"), (4, "field 'image'"), (5, "field 'split'"), (6, "field 'image'"), (7, "field 'image'")]
    assert "gone.png" in reader.problems[1].message and "not found" in reader.problems[1].message
    assert "holdout" in reader.problems[2].message
    assert "inside the dataset folder" in reader.problems[3].message
    assert "not found" in reader.problems[4].message and len(reader.problems[4].message) < 300


def test_jsonl_bad_lines_and_wrong_types(tmp_path):
    png(tmp_path / "a.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.png", "caption": "ok"}\n\n{not json\n[1, 2]\n'
                    '{"image": "a.png", "caption": 7}\n{"image": "a.png"}\n')
    records, reader = read(path, on_error="skip")
    assert len(records) == 1
    assert [(p.record, p.message) for p in reader.problems] == [
        (3, reader.problems[0].message), (4, "expected an object, found list"),
        (5, "field 'caption': expected text, found int"), (6, "field 'caption': empty caption")]
    assert reader.problems[0].message.startswith("not valid JSON")


def test_check_images_off_leaves_missing_images_to_the_check(tmp_path, capsys):
    png(tmp_path / "a.png")
    write_csv(tmp_path / "pairs.csv", ["image", "caption"], [["a.png", "one"], ["gone.png", "two"]])
    records, reader = read(tmp_path, check_images=False)
    assert len(records) == 2 and not reader.problems and records[1].image == str(tmp_path / "gone.png")
    assert check_dataset("image-text", tmp_path, check_images=False)["missing_images"] == ["gone.png"]
    report = check_dataset("image-text", tmp_path, on_error="skip")
    assert report["records"] == 1 and report["problem_count"] == 1
    assert report["problems"][0]["file"] == "pairs.csv" and report["problems"][0]["record"] == 3


def test_data_check_cli(tmp_path, capsys):
    assert main(["data", "check", "--format", "image-text", str(roco(tmp_path)), "--strict"]) == 0
    out = capsys.readouterr().out
    assert "image-text at" in out and "splits: train 3, test 1, val 1" in out and "no problems" in out


def test_empty_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no CSV, TSV, JSONL"):
        read(tmp_path)


def test_unreadable_file_is_skipped_whole(tmp_path):
    png(tmp_path / "a.png")
    write_csv(tmp_path / "bad.csv", ["image", "label"], [["a.png", "x"]])
    write_csv(tmp_path / "good.csv", ["image", "caption"], [["a.png", "fine"]])
    records, reader = read(tmp_path, on_error="skip")
    assert [r.report for r in records] == ["fine"]
    assert [(Path(p.file).name, p.record) for p in reader.problems] == [("bad.csv", 1)]


# ---------------------------------------------------------------------------------------------------
# fuzz: nothing but DataError escapes, and with on_error="skip" nothing at all

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_TARGETS = [("generic", "pairs.csv"), ("generic", "pairs.jsonl"), ("medicat", "release/" + MEDICAT_FILE),
                ("github", "data/validation/radiology/captions.txt"),
                ("github", "data/validation/radiology/dlinks.txt")]


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caption-templates")
    generic = root / "generic"
    png(generic / "images" / "a.png")
    write_csv(generic / "pairs.csv", ["image", "caption", "split"], [["a.png", "one", "train"]])
    write_jsonl(generic / "pairs.jsonl", [{"image": "a.png", "caption": "two", "split": "test"}])
    medicat(root / "medicat")
    roco_github(root / "github")
    return root


def read_both_ways(root: Path) -> None:
    try:
        list(open_dataset("image-text", root).records())
    except DataError:
        pass
    list(open_dataset("image-text", root, on_error="skip").records())


@pytest.mark.parametrize(("layout", "file"), FUZZ_TARGETS)
@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(templates, tmp_path, layout, file, data):
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        root = Path(folder) / layout
        shutil.copytree(templates / layout, root)
        (root / file).write_bytes(data)
        read_both_ways(root)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)
json_records = st.dictionaries(st.sampled_from(["image", "caption", "split", "id", "pdf_hash", "fig_uri",
                                                "s2_caption", "s2orc_references", "radiology", "study_id"]),
                               json_values, max_size=6)


@pytest.mark.parametrize(("layout", "file"), [t for t in FUZZ_TARGETS if t[1].endswith(".jsonl")])
@FUZZ
@given(items=st.lists(json_records | json_values, min_size=1, max_size=3))
def test_fuzz_random_json_records(templates, tmp_path, layout, file, items):
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        root = Path(folder) / layout
        shutil.copytree(templates / layout, root)
        with (root / file).open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(item) + "\n" for item in items)
        read_both_ways(root)
