"""Image-caption pairs (`image-text`): ROCO, MedICaT, and any CSV, TSV, JSONL or JSON list of image + text.

Each pair is a record with the caption in `report` (`meta["caption_source"]` names its column), for
image-text pretraining (AMiF). Layouts:
- ROCO (Pelka et al. 2018): `data/{train,validation,test}/{radiology,non-radiology}/` under the root (also
  `all_data/`, or the root itself), each with a CSV (`id,name,caption`: the Kaggle packaging's
  `radiologytraindata.csv` ...) and images in the sibling `images/` named by `name`; or the GitHub
  release's `captions*.txt` (`ROCO_ID<TAB>caption`) with `dlinks*.txt`, whose images `fetch.py` saves as
  `images/<PMCID>_<name>` (its `cc_*.csv` licence lists are not caption files). The split is the folder
  (validation -> val).
- MedICaT (Subramanian et al. 2020): `release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl`
  (`pdf_hash`, `fig_uri`, `s2_caption`, optional `s2orc_references`, `radiology`), figures
  `release/figures/<pdf_hash>_<fig_uri>`. Any JSONL whose records carry `pdf_hash` and `fig_uri` is read
  this way (figures in a `figures/` folder beside it).
- Generic: the root is a CSV / TSV / JSONL / JSON file, or a folder holding such files. Columns are found
  among IMAGE_COLUMNS and TEXT_COLUMNS (the first present in the header, or in a JSON file's first
  record, wins), or named by options; `findings` / `impression` columns also go to `meta`. Image paths
  are resolved against `image_root` (option), the file's folder, then its `images/` subfolder; a name
  without an image suffix is tried with the usual ones. The split is a `split` column when the file has
  one, else a train / val / validation / test word in the file name, else train.
A missing column, an empty caption or an image that is not on disk is a `DataError` naming the file, the
record (line) and the field.

Options: `image_column`, `text_column`, `id_column`, `study_column`, `patient_column`, `split_column`,
`image_root`, `subset` (all | radiology | non-radiology: ROCO folders, MedICaT's `radiology` flag),
`check_images` (default True; False leaves missing images to `medistill data check`).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medistill.data.formats.base import Reader, register_format
from medistill.data.formats.parsing import At, inside, normalise_header, read_delimited, read_json_list
from medistill.data.imaging import IMAGE_SUFFIXES
from medistill.data.records import Record
from medistill.errors import DataError, UsageError

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "name", "fig_uri")
TEXT_COLUMNS = ("caption", "text", "report", "s2_caption", "findings")
ID_COLUMNS = ("id", "uid", "image_id", "dicom_id")
STUDY_COLUMNS = ("study_id",)
PATIENT_COLUMNS = ("patient_id", "subject_id")
SECTION_COLUMNS = ("findings", "impression")  # copied to meta for the AMiF text-text pair when present
OPTIONS = ("image_column", "text_column", "id_column", "study_column", "patient_column", "split_column",
           "image_root", "subset", "check_images")
SUBSETS = ("all", "radiology", "non-radiology")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "validate": "val", "dev": "val", "test": "test", "testing": "test"}
ROCO_SPLITS = (("train", "train"), ("validation", "val"), ("test", "test"))
ROCO_SUBSETS = ("radiology", "non-radiology")
MEDICAT_GLOB = "s2_full_figures*.jsonl"
_ROCO_CAPTIONS = re.compile(r"captions.*\.txt")
_SPLIT_WORD = re.compile(r"(?<![a-z])(" + "|".join(sorted(SPLIT_VALUES, key=len, reverse=True)) + r")(?![a-z])")


def table_suffix(path: Path) -> str | None:
    """'.csv', '.tsv', '.jsonl' or '.json' (also when gzipped), else None."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in TABLE_SUFFIXES else None


def _stem(path: Path) -> str:
    """'pairs' for pairs.csv and pairs.jsonl.gz."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    suffix = table_suffix(path)
    return name[:-len(suffix)] if suffix and name.lower().endswith(suffix) else path.stem


def split_from_name(name: str) -> str | None:
    """The split a file name says ('roco_test.csv', 'train2017.jsonl'), None when it names none or several."""
    found = {SPLIT_VALUES[word] for word in _SPLIT_WORD.findall(name.lower())}
    return found.pop() if len(found) == 1 else None


@dataclass
class Source:
    """One annotation file and how to read it."""

    path: Path
    split: str | None = None  # forced (a ROCO folder); otherwise split column, file name, train
    kind: str = "table"  # table | roco-text
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Columns:
    image: str | None  # None: MedICaT (pdf_hash + fig_uri)
    text: str
    id: str | None
    study: str | None
    patient: str | None
    split: str | None
    medicat: bool = False


@register_format
class ImageTextReader(Reader):
    name = "image-text"
    description = "image-caption pairs: ROCO, MedICaT, or any CSV / TSV / JSONL with image and caption columns"

    def __init__(self, root: str | Path, *, on_error: str = "raise", **options: Any) -> None:
        super().__init__(root, on_error=on_error, **options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise UsageError(f"{self.name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        image_root = options.get("image_root")
        self.image_root = Path(image_root) if image_root else None
        if self.image_root is not None and not self.image_root.is_dir():
            raise UsageError(f"{self.name}: image_root {self.image_root} is not a folder")

    # ------------------------------------------------------------------------------------------
    # finding the files

    def _roco_base(self) -> Path | None:
        if not self.root.is_dir():
            return None
        for base in (self.root, self.root / "data", self.root / "all_data"):
            if any((base / folder / subset).is_dir() for folder, _ in ROCO_SPLITS for subset in ROCO_SUBSETS):
                return base
        return None

    def _medicat_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        for base in (self.root, self.root / "release"):
            files = sorted(base.glob(MEDICAT_GLOB))
            if files:
                return files
        return []

    def _sources(self) -> list[Source]:
        if self.root.is_file():
            if _ROCO_CAPTIONS.fullmatch(self.root.name.lower()):
                source = self._file_source(self.root)
                return [Source(self.root, source.split, kind="roco-text", meta=source.meta)]
            if table_suffix(self.root) is None:
                self.fail(At(str(self.root)).error("expected a .csv, .tsv, .jsonl or .json file (or a folder)"))
                return []
            return [self._file_source(self.root)]
        base = self._roco_base()
        if base is not None:
            return self._roco_sources(base)
        files = self._medicat_files() or sorted(p for p in self.root.iterdir() if p.is_file() and table_suffix(p))
        if not files:
            self.fail(At(str(self.root)).error(
                "no CSV, TSV, JSONL or JSON caption file here, and not the ROCO or MedICaT layout"))
        return [self._file_source(path) for path in files]

    @staticmethod
    def _file_source(path: Path) -> Source:
        """A file on its own; one inside a ROCO split / subset folder keeps that split."""
        folder, parent = path.parent.name.lower(), path.parent.parent.name.lower()
        if folder in ROCO_SUBSETS and parent in dict(ROCO_SPLITS):
            return Source(path, dict(ROCO_SPLITS)[parent], meta={"subset": folder})
        return Source(path)

    def _roco_sources(self, base: Path) -> list[Source]:
        subset = self.option("subset", "all", SUBSETS)
        sources = []
        for folder, split in ROCO_SPLITS:
            for name in ROCO_SUBSETS:
                directory = base / folder / name
                if not directory.is_dir() or subset not in ("all", name):
                    continue
                tables = sorted(p for p in directory.iterdir()
                                if p.is_file() and table_suffix(p) and not p.name.lower().startswith("cc_"))
                captions = _preferred(p for p in directory.iterdir() if _ROCO_CAPTIONS.fullmatch(p.name.lower()))
                meta = {"subset": name}
                if tables:
                    sources += [Source(path, split, meta=meta) for path in tables]
                elif captions is not None:
                    sources.append(Source(captions, split, kind="roco-text", meta=meta))
                else:
                    self.fail(At(str(directory)).error(
                        "no ROCO caption file: expected a CSV (id,name,caption) or captions.txt + dlinks.txt"))
        return sources

    def referenced_image_dir(self) -> Path | None:
        if self.image_root is not None or self.root.is_file():
            return None
        base = self._roco_base()
        if base is not None:
            return base if self.options.get("subset", "all") == "all" else None  # the other subset: unreferenced
        medicat = self._medicat_files()
        return medicat[0].parent / "figures" if medicat else self.root

    # ------------------------------------------------------------------------------------------
    # reading

    def _read(self) -> Iterator[Record]:
        self.option("subset", "all", SUBSETS)
        self.option("check_images", True, (True, False))
        for source in self._sources():
            if source.kind == "roco-text":
                yield from self._roco_text(source)
            else:
                yield from self._table(source)

    def _table(self, source: Source) -> Iterator[Record]:
        rows = self._rows(source.path)
        columns: Columns | None = None
        for at, item in rows:
            if columns is None:
                header_at = At(at.file, 1) if table_suffix(source.path) in (".csv", ".tsv") else at
                columns = self.attempt(self._columns, item, header_at)
                if columns is None:
                    return  # the file lacks a column: one problem for the whole file
            record = self.attempt(self._record, item, at, columns, source)
            if record is not None and self._in_subset(record):
                yield record

    def _rows(self, path: Path) -> Iterator[tuple[At, dict[str, Any]]]:
        """(where, cells by normalised name) for every record of a CSV / TSV / JSONL / JSON file."""
        suffix = table_suffix(path)
        if suffix in (".csv", ".tsv"):
            for row in self.csv_rows(path, delimiter="\t" if suffix == ".tsv" else ","):
                yield row.at, row.cells
        elif suffix == ".json":
            items = self.attempt(read_json_list, path) or []
            for number, item in enumerate(items, start=1):
                normalised = self.attempt(_object, item, At(str(path), number))
                if normalised is not None:
                    yield At(str(path), number), normalised
        else:
            for at, item in self._jsonl(path):
                normalised = self.attempt(_object, item, at)
                if normalised is not None:
                    yield at, normalised

    def _jsonl(self, path: Path) -> Iterator[tuple[At, Any]]:
        try:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8-sig") as handle:  # type: ignore[operator]
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    at = At(str(path), number)
                    try:
                        yield at, json.loads(line)
                    except (json.JSONDecodeError, RecursionError) as error:
                        self.fail(at.error(f"not valid JSON ({error})"))
        except (OSError, EOFError, UnicodeDecodeError) as error:
            self.fail(DataError(f"cannot read file ({error})", file=str(path)))

    def _columns(self, item: dict[str, Any], at: At) -> Columns:
        """The columns of a file, from its first record: options first, else the first known name present."""
        have = list(item)
        medicat = self.options.get("image_column") is None and (
            ("pdf_hash" in item and "fig_uri" in item) or Path(at.file).match(MEDICAT_GLOB))

        def pick(option: str, candidates: tuple[str, ...], role: str, required: bool) -> str | None:
            wanted = self.options.get(option)
            if wanted is not None:
                name = normalise_header(str(wanted))
                if name not in item:
                    raise at.error(f"no column {name!r} ({option}); the file has {_names(have)}", field=name)
                return name
            name = next((c for c in candidates if c in item), None)
            if name is None and required:
                raise at.error(f"no {role} column: expected one of {', '.join(candidates)} or the option "
                               f"{option}=; the file has {_names(have)}", field=role)
            return name

        return Columns(
            image=None if medicat else pick("image_column", IMAGE_COLUMNS, "image", True),
            text=pick("text_column", TEXT_COLUMNS, "caption", True) or "",
            id=pick("id_column", ID_COLUMNS, "id", False),
            study=pick("study_column", STUDY_COLUMNS, "study", False),
            patient=pick("patient_column", PATIENT_COLUMNS, "patient", False),
            split=pick("split_column", ("split",), "split", False),
            medicat=medicat,
        )

    def _record(self, item: dict[str, Any], at: At, columns: Columns, source: Source) -> Record:
        caption = _text(item, columns.text, at, what="caption")
        folder = source.path.parent
        meta: dict[str, Any] = {"caption_source": columns.text, **source.meta}
        if columns.medicat:
            pdf_hash, fig_uri = _text(item, "pdf_hash", at), _text(item, "fig_uri", at)
            name, image_field = f"{pdf_hash}_{fig_uri}", "fig_uri"
            bases = [folder / "figures", folder / "release" / "figures", folder, folder / "images"]
            uid = name
            references = item.get("s2orc_references")
            if isinstance(references, list):
                meta["references"] = [text for text in references if isinstance(text, str) and text.strip()]
            if isinstance(item.get("radiology"), bool):
                meta["radiology"] = item["radiology"]
        else:
            image_field = columns.image or "image"
            name = _text(item, image_field, at, numbers=True)
            bases = [folder, folder / "images"]
            uid = _text(item, columns.id, at, numbers=True) if columns.id else f"{_stem(source.path)}/{at.record}"
        for section in SECTION_COLUMNS:
            value = item.get(section)
            if isinstance(value, str) and value.strip():
                meta[section] = value.strip()
        return Record(
            uid=uid,
            image=str(self._image(name, bases, at, image_field)),
            split=self._split(item, at, columns, source),
            study_id=_optional(item, columns.study, at),
            patient_id=_optional(item, columns.patient, at),
            report=caption,
            meta=meta,
        )

    def _split(self, item: dict[str, Any], at: At, columns: Columns, source: Source) -> str:
        if source.split is not None:
            return source.split
        if columns.split is not None:
            value = _optional(item, columns.split, at)
            if value is not None:
                split = SPLIT_VALUES.get(value.lower())
                if split is None:
                    raise at.error(f"unknown split {value!r}; expected train, val / validation or test",
                                   field=columns.split)
                return split
        return split_from_name(source.path.name) or "train"

    def _image(self, name: str, bases: list[Path], at: At, image_field: str) -> Path:
        """The first existing file among `bases / name` (image_root first); with check_images, an error when
        none exists, else the first candidate."""
        if self.image_root is not None:
            bases = [self.image_root, *bases]
        candidates = [inside(base, name, at, image_field) for base in bases]
        for candidate in candidates:
            if _is_file(candidate):
                return candidate
            if candidate.suffix.lower() not in IMAGE_SUFFIXES:
                for suffix in IMAGE_SUFFIXES:
                    with_suffix = candidate.parent / f"{candidate.name}{suffix}"
                    if _is_file(with_suffix):
                        return with_suffix
        if self.options.get("check_images", True):
            looked = ", ".join(str(base) for base in dict.fromkeys(bases))
            raise at.error(f"image {name[:120]!r} not found (looked in {looked})", field=image_field)
        return candidates[0]

    def _in_subset(self, record: Record) -> bool:
        subset = self.options.get("subset", "all")
        radiology = record.meta.get("radiology")
        if subset == "all" or radiology is None:
            return True
        return radiology == (subset == "radiology")

    # ------------------------------------------------------------------------------------------
    # ROCO as released on GitHub: captions*.txt + dlinks*.txt

    def _roco_text(self, source: Source) -> Iterator[Record]:
        folder = source.path.parent
        links_path = _preferred(folder.glob("dlinks*.txt"))
        if links_path is None:
            self.fail(At(str(folder)).error("captions.txt without a dlinks.txt: the image names are in dlinks"))
            return
        images: dict[str, str] = {}
        for at, parts in self.attempt(read_delimited, links_path, "\t") or []:
            name = self.attempt(_roco_image_name, parts, at)
            if name is not None:
                images[parts[0]] = name
        for at, parts in self.attempt(read_delimited, source.path, "\t") or []:
            record = self.attempt(self._roco_text_record, parts, at, images, source)
            if record is not None:
                yield record

    def _roco_text_record(self, parts: list[str], at: At, images: dict[str, str], source: Source) -> Record:
        roco_id = parts[0]
        caption = " ".join(parts[1:]).strip()
        if not caption:
            raise at.error("empty caption", field="caption")
        if roco_id not in images:
            raise at.error(f"{roco_id} has no line in dlinks.txt, so its image name is unknown", field="id")
        folder = source.path.parent
        image = self._image(images[roco_id], [folder / "images", folder], at, "name")
        return Record(uid=roco_id, image=str(image), split=source.split or "train", report=caption,
                      meta={"caption_source": "caption", **source.meta})


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; False for names the file system refuses (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _preferred(paths: Iterable[Path]) -> Path | None:
    """Of several versions of a ROCO file, the revised one."""
    ordered = sorted(paths, key=lambda p: ("revised" not in p.name, p.name))
    return ordered[0] if ordered else None


def _roco_image_name(parts: list[str], at: At) -> str:
    """`<PMCID>_<name>`, the file name ROCO's fetch.py gives an image of a dlinks.txt line
    (`ROCO_ID<TAB>wget ... .../PMCID.tar.gz ...<TAB>name`)."""
    if len(parts) < 3:
        raise at.error("expected ROCO_ID<TAB>download command<TAB>image name", field="dlinks")
    archive = next((word for word in parts[1].split() if word.endswith(".tar.gz")), None)
    if archive is None:
        raise at.error("no .tar.gz archive in the download command", field="dlinks")
    return f"{archive.rsplit('/', 1)[-1][:-len('.tar.gz')]}_{parts[-1]}"


def _object(item: Any, at: At) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise at.error(f"expected an object, found {type(item).__name__}")
    return {normalise_header(str(key)): value for key, value in item.items()}


def _text(item: dict[str, Any], column: str, at: At, *, numbers: bool = False, what: str = "value") -> str:
    value = item.get(column)
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise at.error(f"empty {what}", field=column)
    if not isinstance(value, str):
        raise at.error(f"expected text, found {type(value).__name__}", field=column)
    return value.strip()


def _optional(item: dict[str, Any], column: str | None, at: At) -> str | None:
    if column is None:
        return None
    value = item.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(item, column, at, numbers=True)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:12])
    return shown + (f" and {len(names) - 12} more" if len(names) > 12 else "") if names else "no columns"
