"""Shared parsing for the readers: JSON, CSV and delimited text, typed fields and boxes, all failing
with a `DataError` that names the file, the record and the field.

Record numbers: the line number for CSV and text files (the header is line 1), the 1-based position in
the list for JSON and pickle files.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import pickle
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medistill.data.records import Box
from medistill.errors import DataError


@dataclass(frozen=True)
class At:
    """Where a value comes from: the file and the record number."""

    file: str
    record: int | str | None = None

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, file=self.file, record=self.record, field=field)


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when its name ends in .gz (PhysioNet ships its CSVs gzipped)."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except FileNotFoundError:
        raise DataError("file not found", file=str(path)) from None
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read file ({error})", file=str(path)) from None


def find_file(folder: Path, *names: str) -> Path:
    """The first of `names` (each also tried with .gz) that exists in `folder`, else the first name."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return folder / names[0]


def with_image_suffix(stem: Path, suffixes: tuple[str, ...]) -> Path:
    """`stem` + the first of `suffixes` naming an existing file (releases differ: JPEG, PNG or DICOM),
    else `stem` + the first suffix, which the check then reports as missing."""
    for suffix in suffixes:
        candidate = stem.parent / f"{stem.name}{suffix}"
        if candidate.exists():
            return candidate
    return stem.parent / f"{stem.name}{suffixes[0]}"


def read_text(path: Path) -> str:
    """A text file as str (UTF-8, BOM dropped; Latin-1 as the fallback old releases need)."""
    data = read_bytes(path)
    if b"\x00" in data:
        raise DataError("not a text file (contains NUL bytes)", file=str(path))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})",
                        file=str(path)) from None
    except RecursionError:
        raise DataError("JSON nested too deeply", file=str(path)) from None


def read_json_list(path: Path) -> list[Any]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, found {type(data).__name__}", file=str(path))
    return data


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers and scalars only: a pickle cannot run code through this reader."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain lists and dicts are read")


def read_pickle_list(path: Path) -> list[Any]:
    data = read_bytes(path)
    try:
        value = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # noqa: BLE001  (a corrupt pickle raises nearly anything)
        raise DataError(f"not a readable pickle of plain records ({type(error).__name__}: {error})",
                        file=str(path)) from None
    if not isinstance(value, list):
        raise DataError(f"expected a pickled list of records, found {type(value).__name__}", file=str(path))
    return value


def normalise_header(name: str) -> str:
    """'Breast Density', 'breast_density' and ' breast  density ' all become 'breast_density'."""
    return re.sub(r"[\s_]+", "_", name.strip().lower())


@dataclass(frozen=True)
class Row:
    """One CSV data row: its line number and its cells by normalised header name; `error` is set for
    a row too short to hold every column (see `Reader.csv_rows`, which reports and skips those)."""

    at: At
    cells: dict[str, str]
    error: DataError | None = None

    def get(self, column: str, default: str | None = None) -> str | None:
        value = self.cells.get(column)
        return default if value is None or value.strip() == "" else value.strip()

    def require(self, column: str) -> str:
        value = self.get(column)
        if value is None:
            raise self.at.error("empty value", field=column)
        return value

    def number(self, column: str, *, required: bool = True) -> float | None:
        value = self.get(column)
        if value is None:
            if required:
                raise self.at.error("empty value, expected a number", field=column)
            return None
        return to_float(value, self.at, column)


def read_csv(path: Path, *, required: tuple[str, ...] = (), columns: tuple[str, ...] | None = None,
             delimiter: str = ",") -> list[Row]:
    """The data rows of a CSV file, keyed by normalised header, or by `columns` when the file's own
    header cannot name the cells (it is then skipped). A missing required column fails the file; a row
    with fewer cells than named columns carries an `error`."""
    text = read_text(path)
    try:
        lines = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as error:
        raise DataError(f"malformed CSV ({error})", file=str(path)) from None
    if not lines:
        raise DataError("empty file, expected a header line", file=str(path))
    header = list(columns) if columns else [normalise_header(name) for name in lines[0]]
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; the header has {', '.join(header)}",
                        file=str(path))
    width = max((index + 1 for index, name in enumerate(header) if name), default=0)
    rows = []
    for number, cells in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        at = At(str(path), number)
        error = None
        if len(cells) < width:
            error = at.error(f"short row: {len(cells)} cells, expected {width}", field=header[len(cells)])
        rows.append(Row(at, {name: cell for name, cell in zip(header, cells) if name}, error))
    return rows


def read_delimited(path: Path, delimiter: str = "|") -> list[tuple[At, list[str]]]:
    """The non-empty lines of a delimiter-separated text file without a header, split and stripped."""
    return [(At(str(path), number), [part.strip() for part in line.split(delimiter)])
            for number, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]


def to_float(value: Any, at: At, field: str) -> float:
    if isinstance(value, bool):
        raise at.error(f"expected a number, found {value!r}", field=field)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise at.error(f"expected a number, found {str(value)[:40]!r}", field=field) from None
    if not math.isfinite(number):
        raise at.error(f"expected a finite number, found {value!r}", field=field)
    return number


def as_object(item: Any, at: At) -> Mapping[str, Any]:
    if not isinstance(item, dict):
        raise at.error(f"expected an object, found {type(item).__name__}")
    return item


def text_field(item: Mapping[str, Any], key: str, at: At, *, required: bool = True,
               numbers: bool = False, allow_empty: bool = False) -> str | None:
    """A string field of a JSON record, stripped. `numbers` accepts integers and floats (VQA-RAD stores
    some answers and ids as numbers) and turns them into their text."""
    if key not in item or item[key] is None:
        if required:
            raise at.error("missing field", field=key)
        return None
    value = item[key]
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise at.error(f"expected text, found {type(value).__name__}", field=key)
    value = value.strip()
    if not value and not allow_empty:
        if required:
            raise at.error("empty text", field=key)
        return None
    return value


def first_key(item: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """The first of `keys` present in `item` (the first key when none is: the error then names it)."""
    return next((key for key in keys if key in item), keys[0])


def make_box(x1: float, y1: float, x2: float, y2: float, at: At, field: str,
             size: tuple[int, int] | None = None, tolerance: float = 1.0) -> Box:
    """A validated pixel box: finite, x1 < x2, y1 < y2 and, when `size` (width, height) is known,
    inside the image up to `tolerance` pixels."""
    for value in (x1, y1, x2, y2):
        to_float(value, at, field)
    if not (x2 > x1 and y2 > y1):
        raise at.error(f"empty or inverted box ({x1:g}, {y1:g}, {x2:g}, {y2:g}): need x1 < x2 and y1 < y2",
                       field=field)
    if size is not None:
        width, height = size
        if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
            raise at.error(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image",
                           field=field)
    return Box(float(x1), float(y1), float(x2), float(y2))


def inside(root: Path, relative: str, at: At, field: str) -> Path:
    """`root / relative` for a path taken from an annotation file; absolute paths and '..' are refused so
    that no record points outside the dataset folder."""
    cleaned = relative.strip().replace("\\", "/")
    parts = [part for part in cleaned.split("/") if part not in ("", ".")]
    if not parts or cleaned.startswith("/") or ".." in parts or ":" in parts[0]:
        raise at.error(f"expected a path inside the dataset folder, found {relative[:80]!r}", field=field)
    return root.joinpath(*parts)


def answer_type(value: str | None, answer: str, at: At, field: str = "answer_type") -> str:
    """CLOSED or OPEN; the release's spelling (case, trailing spaces) is normalised, and when a dataset
    has no answer type a yes / no answer is CLOSED (the convention of the Med-VQA literature)."""
    if value is None:
        return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"
    normalised = value.strip().upper()
    if normalised not in ("CLOSED", "OPEN"):
        raise at.error(f"expected CLOSED or OPEN, found {value!r}", field=field)
    return normalised
