"""Small datasets written in each release's real layout, with the quirks its SOURCE.md / release lists.

Every writer takes a folder and returns it; images are tiny so the tests stay fast.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

FAKE_PATIENT = "Doe^Jane"
FAKE_PATIENT_ID = "SECRET-4711"


def grey(path: Path, size: tuple[int, int] = (32, 32), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0]), value, dtype=np.uint8)
    array[: size[1] // 2] = 255 - value
    Image.fromarray(array).save(path)
    return path


def write_dicom(path: Path, array: np.ndarray, *, photometric: str = "MONOCHROME2", **elements: object) -> Path:
    """A minimal secondary-capture DICOM carrying a fake patient name, id, birth date and accession."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientName = FAKE_PATIENT
    dataset.PatientID = FAKE_PATIENT_ID
    dataset.PatientBirthDate = "19700101"
    dataset.AccessionNumber = "ACC-0815"
    dataset.set_pixel_data(array, photometric_interpretation=photometric, bits_stored=array.dtype.itemsize * 8)
    for name, value in elements.items():
        setattr(dataset, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _csv(path: Path, header: list[str] | str, rows: list[list[object]], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        if isinstance(header, str):
            handle.write(header + newline)
        else:
            csv.writer(handle, lineterminator=newline).writerow(header)
        csv.writer(handle, lineterminator=newline).writerows(rows)


def vqa_rad(root: Path) -> Path:
    """Official layout: qid "0" as text, an integer answer, 'CLOSED ', compound question type, Yes/yes,
    a train/test duplicate triplet and one never-referenced image."""
    images = root / "VQA_RAD Image Folder"
    for name in ("synpic1.jpg", "synpic2.jpg", "synpic3.jpg", "synpic_unused.jpg"):
        grey(images / name)

    def item(qid, phrase, image, question, answer, answer_type="CLOSED", qtype="PRES"):
        return {"qid": qid, "phrase_type": phrase, "qid_linked_id": f"link-{qid}", "image_case_url": "url",
                "image_name": image, "image_organ": "CHEST", "evaluation": "not evaluated", "question": question,
                "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
                "question_type": qtype, "answer": answer, "answer_type": answer_type}

    records = [
        item("0", "freeform", "synpic1.jpg", "Is there a mass?", "Yes"),
        item(1, "para", "synpic1.jpg", "Is a mass present?", "yes", "CLOSED ", "PRES, POS"),
        item(2, "freeform", "synpic2.jpg", "How many lesions?", 2, "OPEN", "COUNT"),
        item(3, "freeform", "synpic3.jpg", "Where is the lesion?", "Left lobe", "OPEN", "POS"),
        item(4, "test_freeform", "synpic3.jpg", "Where is the lesion?", "Left lobe", "OPEN", "POS"),
        item(5, "test_para", "synpic2.jpg", "Is this an MRI?", "No", "CLOSED ", "Other"),
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records, indent=1))
    return root


def vqa_rad_mevf(root: Path) -> Path:
    grey(root / "images" / "synpic1.jpg")
    fields = {"image_organ": "HEAD", "question_type": "PRES", "phrase_type": "freeform"}
    (root / "trainset.json").write_text(json.dumps([
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a bleed?", "answer": "no",
         "answer_type": "CLOSED", **fields}]))
    (root / "testset.json").write_text(json.dumps([
        {"qid": 2, "image_name": "synpic1.jpg", "question": "What organ?", "answer": "brain",
         "answer_type": "OPEN", **fields, "phrase_type": "test_freeform"}]))
    return root


MIAS_INFO = """              MAMMOGRAPHIC IMAGE ANALYSIS SOCIETY
                  MiniMammographic Database

Free text with words like mdb and columns: 1st column: MIAS database reference number.
5th,6th columns: x,y image-coordinates of centre of abnormality.
=================================================================

mdb001 G CIRC B 535 425 197
mdb002 G CIRC B 522 280 69
mdb003 D NORM 
mdb005 F CIRC B 477 133 30
mdb005 F CIRC B 500 168 26
mdb059 F CIRC B
mdb216 D CALC M *NOTE 3* 
mdb023 G CIRC M 538 681 29

=================================================================
"""


def mini_mias(root: Path) -> Path:
    """Free-text header, two rows for mdb005, rows without coordinates, PGM and PNG images."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Info.txt").write_text(MIAS_INFO)
    for number in (1, 2, 3, 5, 23, 59, 216):
        grey(root / f"mdb{number:03d}.{'pgm' if number % 2 else 'png'}")
    return root


def nih_cxr(root: Path) -> Path:
    """Split bracketed headers, CRLF box file, Infiltration / Infiltrate, No Finding, '058Y' age."""
    _csv(root / "Data_Entry_2017.csv",
         "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
         "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],",
         [["00000001_000.png", "Infiltration|Effusion", 0, 1, 58, "M", "PA", 2500, 2048, 0.168, 0.168],
          ["00000002_000.png", "No Finding", 0, 2, "061Y", "F", "AP", 2048, 2500, 0.168, 0.168],
          ["00000003_001.png", "Mass", 1, 3, 40, "F", "PA", 2021, 2021, 0.19, 0.19]])
    _csv(root / "BBox_List_2017.csv", "Image Index,Finding Label,Bbox [x,y,w,h],,,",
         [["00000001_000.png", "Infiltrate", 225.08, 547.01, 86.77, 79.18],
          ["00000001_000.png", "Effusion", 686.1, 131.5, 185.4, 313.4],
          ["00000003_001.png", "Mass", 100, 100, 50.5, 60]], newline="\r\n")
    for name in ("00000001_000.png", "00000002_000.png", "00000003_001.png"):
        grey(root / "images" / name)
    return root


CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices"]
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 There is a small left pleural effusion.  No pneumothorax.

 IMPRESSION:
 Small left effusion.
"""


def mimic_cxr(root: Path, suffix: str = ".jpg") -> Path:
    """Two studies of one subject, CheXpert 1 / 0 / -1 / blank, 'validate' split, report sections and
    an MS-CXR box."""
    images = [("dicom-a", "10000032", "50000001", "PA", "train"), ("dicom-b", "10000032", "50000001", "LATERAL",
               "train"), ("dicom-c", "10000032", "50000002", "AP", "validate")]
    _csv(root / "mimic-cxr-2.0.0-metadata.csv",
         ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
          "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
          "PatientOrientationCodeSequence_CodeMeaning"],
         [[d, s, t, "CHEST (PA AND LAT)", v, 32, 32, 21800506, 213014.5, "CHEST", "postero-anterior", "Erect"]
          for d, s, t, v, _ in images])
    _csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
         [[d, t, s, split] for d, s, t, _, split in images])
    first = ["1.0", "", "0.0", "-1.0"] + [""] * 10
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT],
         [["10000032", "50000001", *first], ["10000032", "50000002", *([""] * 8 + ["1.0"] + [""] * 5)]])
    _csv(root / "ms-cxr-boxes.csv", ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                                     "image_width", "image_height", "split"],
         [["dicom-a", "Pleural Effusion", "small left effusion", "files/p10/...", 2, 20, 10, 8, 32, 32, "test"]])
    for dicom, subject, study, _, _ in images:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        grey(folder / f"{dicom}{suffix}")
        folder.with_suffix(".txt").write_text(REPORT)
    return root


CBIS_MASS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"]
CBIS_CALC = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"]


def cbis_ddsm(root: Path) -> Path:
    """Both header spellings, paths with trailing newlines, DICOM full mammograms with a fake patient
    name, two abnormalities on one image, BENIGN_WITHOUT_CALLBACK, and one case laid out as a TCIA
    download renames it."""
    image = np.linspace(0, 4095, 32 * 32, dtype=np.uint16).reshape(32, 32)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:16, 8:16] = 255
    uid = "1.3.6.1.4.1.9590.100.1.2.1"
    mass_rows, calc_rows = [], []
    for case, rows, kind, pathology, abnormalities in (
            ("Mass-Training_P_00001_LEFT_CC", mass_rows, "mass", "MALIGNANT", 2),
            ("Calc-Test_P_00038_RIGHT_MLO", calc_rows, "calcification", "BENIGN_WITHOUT_CALLBACK", 1)):
        full = f"{case}/{uid}.1/{uid}.2/000000.dcm"
        write_dicom(root / full, image, BitsStored=12)
        for number in range(1, abnormalities + 1):
            roi = f"{case}_{number}/{uid}.3/{uid}.4/000001.dcm"
            write_dicom(root / roi, mask)
            side, view = case.split("_")[3:5]
            descriptors = ["OVAL", "CIRCUMSCRIBED"] if kind == "mass" else ["PLEOMORPHIC", "CLUSTERED"]
            rows.append([case.split("_", 1)[1][:7], 3, side, view, number, kind, *descriptors, 4, pathology, 5,
                         full, f"{case}_{number}/crop/000000.dcm\n", roi + "\n"])
    tcia = "Mass-Test_P_00016_LEFT_CC"
    write_dicom(root / tcia / "07-20-2016-DDSM-1" / "1.000000-full mammogram images-1" / "1-1.dcm", image)
    write_dicom(root / f"{tcia}_1" / "08-29-2017-DDSM-2" / "1.000000-ROI mask images-2" / "1-1.dcm", mask)
    grey(root / f"{tcia}_1" / "08-29-2017-DDSM-2" / "1.000000-cropped images-3" / "1-2.png")
    tcia_row = ["P_00016", 2, "LEFT", "CC", 1, "mass", "IRREGULAR", "SPICULATED", 5, "BENIGN", 4,
                f"{tcia}/{uid}.5/{uid}.6/000000.dcm", f"{tcia}_1/x/y/000000.dcm", f"{tcia}_1/{uid}.7/{uid}.8/000001.dcm"]
    _csv(root / "mass_case_description_train_set.csv", CBIS_MASS, mass_rows)
    _csv(root / "mass_case_description_test_set.csv", CBIS_MASS, [tcia_row])
    _csv(root / "calc_case_description_test_set.csv", CBIS_CALC, calc_rows)
    return root


def med_grit(root: Path) -> Path:
    """BiRD pairs (VG, ROC, RC, MIA), LLaVA from/value with Qwen2-VL box tokens, ShareGPT messages;
    an x_ray_ prefix whose modality has an underscore."""
    grey(root / "images" / "ct_0001.png", size=(200, 100))
    grey(root / "images" / "x_ray_0002.png", size=(100, 100))
    bird = [{"id": "ct_0001", "conversations": [
        ["<img>ct_0001.png</img> Where is <ref>liver</ref>?", "<ref>liver</ref><box>(100,200),(500,600)</box>"],
        ["What is in <box>(100,200),(500,600)</box>?", "liver"],
        ["Please describe the region <box>(0,0),(1000,1000)</box>.", "An abdominal CT slice."],
        ["Describe this image.", "An axial CT of the abdomen."]]}]
    (root / "test.json").write_text(json.dumps(bird))
    llava = [{"id": "x_ray_0002", "image": "x_ray_0002.png", "conversations": [
        {"from": "human", "value": "<image>\nFind <|object_ref_start|>nodule<|object_ref_end|>."},
        {"from": "gpt", "value": "<|object_ref_start|>nodule<|object_ref_end|><|box_start|>(10,10),(20,30)"
                                 "<|box_end|>"}]}]
    (root / "train.json").write_text(json.dumps(llava))
    sharegpt = [{"images": ["images/x_ray_0002.png"], "messages": [
        {"role": "user", "content": "<image>What modality is this?"}, {"role": "assistant", "content": "CT"}]}]
    (root / "train_sharegpt.json").write_text(json.dumps(sharegpt))
    return root


def slake(root: Path) -> Path:
    """Slake1.0/ with train / validate / test, an English and a Chinese question, mask and detection."""
    base = root / "Slake1.0"
    grey(base / "imgs" / "xmlab1" / "source.jpg", size=(64, 64))
    grey(base / "imgs" / "xmlab1" / "mask.png", size=(64, 64))
    (base / "imgs" / "xmlab1" / "detection.json").write_text(json.dumps([{"Liver": [10, 12, 20, 18]}]))
    grey(base / "imgs" / "xmlab2" / "source.jpg", size=(64, 64))

    def item(qid, image, question, answer, lang="en", answer_type="CLOSED"):
        return {"img_id": int(image[5:6]), "img_name": f"{image}/source.jpg", "question": question,
                "answer": answer, "q_lang": lang, "location": "Abdomen", "modality": "CT",
                "answer_type": answer_type, "base_type": "vqa", "content_type": "Organ", "triple": ["_"] * 3,
                "qid": qid}

    (base / "train.json").write_text(json.dumps([item(0, "xmlab1", "Does the picture contain liver?", "Yes"),
                                                 item(1, "xmlab1", "图片中包含肝脏吗?", "是", "zh")]))
    (base / "validate.json").write_text(json.dumps([item(2, "xmlab2", "What organ is this?", "Lung", "en",
                                                         "OPEN")]))
    (base / "test.json").write_text(json.dumps([item(3, "xmlab2", "Is this a CT?", "Yes")]))
    return root


def pathvqa(root: Path, form: str = "pkl") -> Path:
    """The release's pickles (plain lists of dicts), or the JSON variant."""
    for split, items in (("train", [{"image": "train_0001", "question": "Is this tissue necrotic?", "answer": "yes"},
                                    {"image": "train_0002", "question": "What is shown?", "answer": "granuloma"}]),
                         ("test", [{"image": "test_0001", "question": "Are nuclei visible?", "answer": "no"}])):
        folder = root / "qas" / split
        folder.mkdir(parents=True, exist_ok=True)
        if form == "pkl":
            (folder / f"{split}_qa.pkl").write_bytes(pickle.dumps(items))
        else:
            (folder / f"{split}_qa.json").write_text(json.dumps(items))
        for entry in items:
            grey(root / "images" / split / f"{entry['image']}.jpg")
    return root


def vqa_med_2019(root: Path) -> Path:
    """All_QA_Pairs + per-category files for train and validation; the test file with categories and
    '#'-separated alternative answers."""
    train = root / "ImageClef-2019-VQA-Med-Training"
    pairs = [("synpic100", "what modality is shown?", "ct w/contrast (iv)", "Modality"),
             ("synpic101", "in what plane was this image taken?", "axial", "Plane"),
             ("synpic102", "is this a normal image?", "no", "Abnormality")]
    (train / "QAPairsByCategory").mkdir(parents=True)
    (train / "All_QA_Pairs_train.txt").write_text("".join(f"{i}|{q}|{a}\n" for i, q, a, _ in pairs))
    for number, category in enumerate(("Modality", "Plane", "Organ", "Abnormality"), start=1):
        (train / "QAPairsByCategory" / f"C{number}_{category}_train.txt").write_text(
            "".join(f"{i}|{q}|{a}\n" for i, q, a, c in pairs if c == category))
    for image, *_ in pairs:
        grey(train / "Train_images" / f"{image}.jpg")
    val = root / "ImageClef-2019-VQA-Med-Validation"
    val.mkdir()
    (val / "All_QA_Pairs_val.txt").write_text("synpic200|what organ system is shown?|skull and contents\n")
    grey(val / "Val_images" / "synpic200.jpg")
    test = root / "VQAMed2019Test"
    test.mkdir()
    (test / "VQAMed2019_Test_Questions_w_Ref_Answers.txt").write_text(
        "synpic300|modality|what imaging method was used?|ct noncontrast#ct without contrast\n"
        "synpic301|abnormality|what is abnormal in the ct scan?|appendicitis\n")
    for image in ("synpic300", "synpic301"):
        grey(test / "VQAMed2019_Test_Images" / f"{image}.jpg")
    return root


WRITERS = {"vqa-rad": vqa_rad, "mini-mias": mini_mias, "nih-cxr": nih_cxr, "mimic-cxr": mimic_cxr,
           "cbis-ddsm": cbis_ddsm, "med-grit": med_grit, "slake": slake, "pathvqa": pathvqa,
           "vqa-med-2019": vqa_med_2019}
