"""One function for PNG, JPEG, PGM, 16-bit PNG and DICOM; DICOM tests use pydicom-data's real files."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medistill.data import cache as cache_module
from medistill.data.cache import ImageCache
from medistill.data.imaging import image_size, load_image
from medistill.errors import DataError

sys.path.insert(0, str(Path(__file__).parent / "formats"))
from format_layouts import FAKE_PATIENT, FAKE_PATIENT_ID, cbis_ddsm, write_dicom  # noqa: E402

pydicom = pytest.importorskip("pydicom")
get_testdata_file = pytest.importorskip("pydicom.data").get_testdata_file


def dicom_file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available offline (install pydicom-data)")
    return path


@pytest.mark.parametrize(("suffix", "mode", "peak"), [
    (".png", "L", 255), (".jpg", "L", 255), (".pgm", "L", 255), (".png", "I;16", 65535), (".pgm", "I;16", 65535)])
def test_raster_formats_scale_to_unit_range(tmp_path, suffix, mode, peak):
    array = np.zeros((20, 30), dtype=np.uint16 if peak > 255 else np.uint8)
    array[:, 15:] = peak
    path = tmp_path / f"image{suffix}"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode in (mode, "I")
    loaded = load_image(path)
    assert loaded.dtype == np.float32 and loaded.shape == (20, 30)
    assert loaded[:, :10].max() < 0.05 and loaded[:, 20:].min() > 0.95
    assert load_image(path, size=16).shape == (16, 16)
    assert image_size(path) == (30, 20)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_undecodable_files_are_data_errors(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match="cannot decode image") as raised:
        load_image(path)
    assert raised.value.file == str(path)


def test_truncated_png_and_missing_file(tmp_path):
    path = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError):
        load_image(path)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "absent.png")


def test_dicom_rescale_and_window_from_real_files():
    ct = pydicom.dcmread(dicom_file("CT_small.dcm"))
    assert float(ct.RescaleSlope) == 1.0 and "WindowCenter" not in ct
    image = load_image(dicom_file("CT_small.dcm"))
    assert image.shape == (128, 128) and image.min() == 0.0 and image.max() == 1.0  # no window: min-max
    mr = load_image(dicom_file("MR_small.dcm"))  # window centre 600, width 1600
    raw = pydicom.dcmread(dicom_file("MR_small.dcm")).pixel_array.astype(float)
    expected = np.clip((raw - (600 - 0.5)) / (1600 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(mr, expected, atol=1e-5)


def test_dicom_voi_lut_sequence():
    image = load_image(dicom_file("vlut_04.dcm"))
    assert image.shape == (512, 512) and 0.0 <= image.min() < image.max() <= 1.0


@pytest.mark.parametrize("compressed", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_transfer_syntaxes_decode_like_the_uncompressed_file(compressed):
    np.testing.assert_array_equal(load_image(dicom_file(compressed)), load_image(dicom_file("MR_small.dcm")))


def test_missing_decoder_names_the_transfer_syntax_and_the_extra():
    pytest.importorskip("pydicom")
    try:
        import libjpeg  # noqa: F401
        pytest.skip("pylibjpeg-libjpeg is installed: JPEG lossless decodes")
    except ImportError:
        pass
    with pytest.raises(DataError) as raised:
        load_image(dicom_file("JPEG-LL.dcm"))
    assert "JPEG Lossless" in raised.value.message and "1.2.840.10008.1.2.4.70" in raised.value.message
    assert "medistill[dicom-codecs]" in raised.value.message


def test_multiframe_needs_an_explicit_frame():
    with pytest.raises(DataError, match="10 frames"):
        load_image(dicom_file("emri_small.dcm"))
    frames = [load_image(dicom_file("emri_small.dcm"), frame=index) for index in (0, 9)]
    assert frames[0].shape == (64, 64) and not np.array_equal(*frames)
    with pytest.raises(DataError, match="out of range"):
        load_image(dicom_file("emri_small.dcm"), frame=10)


def test_colour_dicom_becomes_grey():
    assert load_image(dicom_file("US1_UNCR.dcm")).shape == (480, 640)
    assert load_image(dicom_file("SC_rgb.dcm"), size=32).shape == (32, 32)


def test_monochrome1_is_inverted_and_rescale_applies(tmp_path):
    array = np.arange(64, dtype=np.uint16).reshape(8, 8) * 10
    plain = write_dicom(tmp_path / "m2.dcm", array, BitsStored=16)
    inverted = write_dicom(tmp_path / "m1.dcm", array, photometric="MONOCHROME1", BitsStored=16)
    np.testing.assert_allclose(load_image(inverted), 1.0 - load_image(plain), atol=1e-6)
    hounsfield = write_dicom(tmp_path / "ct.dcm", array, RescaleSlope=2, RescaleIntercept=-500,
                             WindowCenter=-300, WindowWidth=401)
    image = load_image(hounsfield)  # HU = 2 * raw - 500, then the linear window of PS3.3 C.11.2.1.2
    hounsfield_units = 2.0 * array - 500
    expected = np.clip((hounsfield_units - (-300 - 0.5)) / (401 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image.flat[10] == pytest.approx(0.50125) and image.max() == 1.0


def test_corrupt_dicom_and_no_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "ok.dcm", np.zeros((8, 8), dtype=np.uint8))
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-40])
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    for name in ("cut.dcm", "junk.dcm"):
        with pytest.raises(DataError) as raised:
            load_image(tmp_path / name)
        assert raised.value.file == str(tmp_path / name)
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(tmp_path / "empty.dcm")
    with pytest.raises(DataError, match="without pixel data"):
        load_image(tmp_path / "empty.dcm")


def test_dicom_without_extension_is_recognised(tmp_path):
    path = write_dicom(tmp_path / "000000", np.full((4, 6), 7, dtype=np.uint8))
    assert load_image(path).shape == (4, 6) and image_size(path) == (6, 4)


def test_patient_identifiers_never_reach_logs_errors_or_reports(tmp_path, caplog):
    from medistill.data.checks import check_dataset, format_check_report
    from medistill.data.formats import open_dataset

    caplog.set_level(logging.DEBUG)
    root = cbis_ddsm(tmp_path / "cbis")
    report = check_dataset("cbis-ddsm", root)
    for record in open_dataset("cbis-ddsm", root).records():  # every image and mask carries the fake name
        load_image(record.image, size=16)
        load_image(record.regions[0].mask)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(Path(record.image).read_bytes()[:400])
    with pytest.raises(DataError) as raised:
        load_image(broken)
    text = json.dumps(report) + format_check_report(report) + caplog.text + str(raised.value)
    assert report["records"] == 4
    for secret in (FAKE_PATIENT, "Doe", FAKE_PATIENT_ID, "19700101", "ACC-0815"):
        assert secret not in text


def test_cache_returns_the_image_persists_and_notices_edits(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "_GROWTH", 2)
    paths = []
    for index in range(5):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(np.full((10, 12), index * 40, dtype=np.uint8)).save(paths[-1])
    with ImageCache(tmp_path / "cache", size=8) as cache:
        first = [cache.load(path) for path in paths]
        assert all(np.array_equal(cache.load(path), image) for path, image in zip(paths, first))
    np.testing.assert_allclose(first[3], load_image(paths[3], size=8), atol=1 / 255)
    reopened = ImageCache(tmp_path / "cache", size=8)
    assert len(reopened.index) == 5
    monkeypatch.setattr(cache_module, "load_image", lambda *a, **k: pytest.fail("decoded a cached image"))
    assert np.array_equal(reopened.load(paths[4]), first[4])
    monkeypatch.undo()
    Image.fromarray(np.full((10, 12), 255, dtype=np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(1, 10**18))
    assert reopened.load(paths[0]).min() == 1.0
    assert ImageCache(tmp_path / "cache", size=16).folder != reopened.folder


@pytest.mark.realdata
@pytest.mark.parametrize("pattern", ["vqa_rad/VQA_RAD Image Folder/*.jpg", "mini_mias/mdb00*.png",
                                     "nih_cxr_bbox/images/*.png"])
def test_real_images_load(shared_data, pattern):
    paths = sorted(shared_data.glob(pattern))[:4]
    if not paths:
        pytest.skip(f"no files match {pattern} in {shared_data}")
    for path in paths:
        image = load_image(path, size=224)
        assert image.shape == (224, 224) and 0.0 <= image.min() < image.max() <= 1.0
