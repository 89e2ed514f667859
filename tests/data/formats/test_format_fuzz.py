"""Property-based: random bytes, random records and random rows fed to every reader and to
`load_image`; nothing but `DataError` may escape, and with on_error='skip' nothing escapes at all."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from format_layouts import WRITERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medistill.data.formats import open_dataset
from medistill.data.imaging import load_image
from medistill.errors import DataError

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ANNOTATIONS = {
    "vqa-rad": ["VQA_RAD Dataset Public.json"],
    "mini-mias": ["Info.txt"],
    "nih-cxr": ["Data_Entry_2017.csv", "BBox_List_2017.csv"],
    "mimic-cxr": ["mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-split.csv",
                  "ms-cxr-boxes.csv", "files/p10/p10000032/s50000001.txt"],
    "cbis-ddsm": ["mass_case_description_train_set.csv", "calc_case_description_test_set.csv"],
    "med-grit": ["test.json", "train.json", "train_sharegpt.json"],
    "slake": ["Slake1.0/train.json", "Slake1.0/imgs/xmlab1/detection.json"],
    "pathvqa": ["qas/train/train_qa.pkl"],
    "vqa-med-2019": ["ImageClef-2019-VQA-Med-Training/All_QA_Pairs_train.txt",
                     "VQAMed2019Test/VQAMed2019_Test_Questions_w_Ref_Answers.txt"],
}
TARGETS = [(name, file) for name, files in ANNOTATIONS.items() for file in files]
JSON_TARGETS = [(name, file) for name, file in TARGETS if file.endswith(".json")]
TEXT_TARGETS = [(name, file) for name, file in TARGETS if file.endswith((".csv", ".txt"))]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12)
record_keys = st.sampled_from(["qid", "image_name", "question", "answer", "answer_type", "phrase_type", "id",
                               "conversations", "messages", "images", "image", "img_name", "q_lang", "Liver"])
records = st.dictionaries(record_keys, json_values, max_size=8)
cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
rows = st.lists(st.lists(cells | st.sampled_from(["1.0", "-1", "", "10", "1e400", "nan", "MALIGNANT"]),
                         max_size=16), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("templates")
    for name, write in WRITERS.items():
        write(root / name)
    return root


def read_all(name: str, root: Path) -> None:
    """Both error modes: raise lets only DataError out; skip lets nothing out."""
    try:
        list(open_dataset(name, root).records())
    except DataError:
        pass
    reader = open_dataset(name, root, on_error="skip")
    list(reader.records())


def fuzzed(templates: Path, name: str, file: str, change) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / name
        shutil.copytree(templates / name, root)
        change(root / file)
        read_all(name, root)


@pytest.mark.parametrize(("name", "file"), TARGETS)
@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_in_annotation_files(templates, name, file, data):
    fuzzed(templates, name, file, lambda path: path.write_bytes(data))


@pytest.mark.parametrize(("name", "file"), JSON_TARGETS)
@FUZZ
@given(item=records | json_values, position=st.integers(0, 3))
def test_random_json_records(templates, name, file, item, position):
    def change(path: Path) -> None:
        items = json.loads(path.read_text())
        items.insert(min(position, len(items)), item)
        path.write_text(json.dumps(items))

    fuzzed(templates, name, file, change)


@pytest.mark.parametrize(("name", "file"), TEXT_TARGETS)
@FUZZ
@given(lines=rows, delimiter=st.sampled_from([",", "|", " "]))
def test_random_rows(templates, name, file, lines, delimiter):
    def change(path: Path) -> None:
        extra = "".join(delimiter.join(line) + "\n" for line in lines)
        path.write_text(path.read_text() + extra)

    fuzzed(templates, name, file, change)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".pgm", ".dcm", ""])
@FUZZ
@given(data=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                                                               b"P5\n4 4\n255\n", b"\x00" * 128 + b"DICM"]))
def test_random_bytes_as_images(tmp_path, suffix, data, prefix):
    path = tmp_path / f"image{suffix}"
    path.write_bytes(prefix + data)
    try:
        load_image(path, size=8)
    except DataError:
        pass
