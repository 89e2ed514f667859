"""Image I/O: one function that reads any supported file into a float32 grey array in [0, 1].

PNG (8 and 16 bit), JPEG, PGM and anything else Pillow opens, and DICOM through pydicom (the `dicom`
extra): modality LUT (rescale slope / intercept), then the VOI LUT or window centre / width, MONOCHROME1
inverted, colour turned grey, multi-frame files read one chosen frame at a time.

Patient identifiers never leave this module: messages name the file and the problem, never a data
element's value, and exception texts from the DICOM decoders are not passed on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medistill.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
_INSTALL_DICOM = "install the DICOM extra: pip install 'medistill[dicom]'"
_INSTALL_CODECS = "install them with pip install 'medistill[dicom-codecs]'"


def load_image(path: str | Path, *, size: int | None = None, frame: int | None = None) -> np.ndarray:
    """Read a grey image as float32 (H, W) scaled to [0, 1]; optionally resized to size x size.

    `frame` picks one frame of a multi-frame DICOM (0-based); a multi-frame file without it is an error,
    so that no frame is chosen silently.
    """
    path = Path(path)
    if is_dicom(path):
        array = _read_dicom(path, frame)
        return resize(array, size) if size else array
    try:
        with Image.open(path) as image:
            if size and image.format == "JPEG":
                image.draft("L", (size, size))  # decode at a reduced DCT scale, never below `size`
            array = _to_float(image)
    except FileNotFoundError:
        raise DataError("image file not found", file=str(path)) from None
    except DataError as error:
        raise DataError(error.message, file=str(path)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image ({type(error).__name__}: {error})", file=str(path)) from None
    return resize(array, size) if size else array


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    path = Path(path)
    if is_dicom(path):
        dataset = _dcmread(path, stop_before_pixels=True)
        try:
            return int(dataset.Columns), int(dataset.Rows)
        except (AttributeError, TypeError, ValueError):
            raise DataError("DICOM without valid Rows / Columns", file=str(path)) from None
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DataError("image file not found", file=str(path)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image header ({type(error).__name__})", file=str(path)) from None


def is_dicom(path: Path) -> bool:
    """By extension, or for files without a known image extension by the 'DICM' preamble marker."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _to_float(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return np.clip(array / peak, 0.0, 1.0)
    if image.mode == "F":
        return _min_max(np.asarray(image, dtype=np.float32))
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def resize(array: np.ndarray, size: int) -> np.ndarray:
    """Resize a float (H, W) array to size x size with bilinear filtering (antialiased when shrinking)."""
    if array.shape == (size, size):
        return array
    image = Image.fromarray(array.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise DataError(f"reading DICOM needs pydicom: {_INSTALL_DICOM}") from None
    return pydicom


def _dcmread(path: Path, *, stop_before_pixels: bool = False) -> Any:
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise DataError("image file not found", file=str(path)) from None
    except Exception as error:  # noqa: BLE001  (pydicom raises many types on corrupt input)
        raise DataError(f"not a readable DICOM file ({type(error).__name__})", file=str(path)) from None


def _read_dicom(path: Path, frame: int | None) -> np.ndarray:
    dataset = _dcmread(path)
    if "PixelData" not in dataset:
        raise DataError("DICOM file without pixel data", file=str(path))
    syntax = dataset.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(dataset) else None
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001
        raise _decode_error(path, syntax, error) from None
    frames = int(dataset.get("NumberOfFrames") or 1)
    samples = int(dataset.get("SamplesPerPixel") or 1)
    if frames > 1:
        if frame is None:
            raise DataError(f"multi-frame DICOM with {frames} frames: choose one with frame=0..{frames - 1}",
                            file=str(path))
        if not 0 <= frame < frames:
            raise DataError(f"frame {frame} out of range: the file has {frames} frames", file=str(path))
        pixels = pixels[frame]
    elif frame not in (None, 0):
        raise DataError(f"frame {frame} out of range: the file has one frame", file=str(path))
    try:
        return _dicom_to_float(dataset, pixels, samples)
    except DataError as error:
        raise DataError(error.message, file=str(path)) from None
    except Exception as error:  # noqa: BLE001  (inconsistent LUT / window elements)
        raise DataError(f"cannot apply the DICOM grey-level transforms ({type(error).__name__})",
                        file=str(path)) from None


def _decode_error(path: Path, syntax: Any, error: Exception) -> DataError:
    name = getattr(syntax, "name", None) or "unknown"
    uid = str(syntax) if syntax else "none given"
    missing_plugin = isinstance(error, (RuntimeError, NotImplementedError)) and (
        "missing dependencies" in str(error) or "no pixel data handler" in str(error).lower()
        or "not supported" in str(error) or "Unable to decode" in str(error))
    if missing_plugin and syntax is not None and getattr(syntax, "is_compressed", False):
        return DataError(f"cannot decode the DICOM transfer syntax {name} ({uid}) with the decoders "
                         f"installed: {_INSTALL_CODECS}", file=str(path))
    return DataError(f"cannot decode DICOM pixel data, transfer syntax {name} ({uid}) "
                     f"({type(error).__name__})", file=str(path))


def _dicom_to_float(dataset: Any, pixels: np.ndarray, samples: int) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if samples == 3 or str(dataset.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        return _colour_to_grey(dataset, pixels)
    values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
    if "VOILUTSequence" in dataset:
        bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        mapped = apply_voi_lut(np.rint(values).astype(np.int64), dataset, index=0)
        grey = np.asarray(mapped, dtype=np.float64) / float(2 ** bits - 1)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        grey = _window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth),
                       str(dataset.get("VOILUTFunction", "LINEAR")).upper())
    else:
        grey = _min_max(values)
    if str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 1.0 - grey
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


def _colour_to_grey(dataset: Any, pixels: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if str(dataset.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, dataset)
        peak = float(2 ** 16 - 1) if pixels.dtype == np.uint16 else 255.0
    else:
        peak = float(2 ** int(dataset.get("BitsStored") or 8) - 1)
    rgb = np.asarray(pixels, dtype=np.float64)
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(grey / peak, 0.0, 1.0).astype(np.float32)


def _first(value: Any) -> float:
    """A window element can be multi-valued: the first value is the default window."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2: the LINEAR (default), LINEAR_EXACT and SIGMOID VOI functions into [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return (values - (centre - width / 2.0)) / max(width, 1e-6)
    if width < 1.0:
        raise DataError(f"window width {width:g} below 1")
    return (values - (centre - 0.5)) / max(width - 1.0, 1e-6) + 0.5


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(np.min(values)), float(np.max(values))
    if not np.isfinite(low) or not np.isfinite(high):
        raise DataError("image contains non-finite values")
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
