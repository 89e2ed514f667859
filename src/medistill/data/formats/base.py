"""The interface every dataset reader shares, and the registry that finds a reader by format name."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from medistill.data.formats.parsing import Row, read_csv
from medistill.data.records import Record
from medistill.errors import DataError, UsageError

T = TypeVar("T")

log = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")


@dataclass(frozen=True)
class Problem:
    """A malformed record that was skipped (or would have been raised)."""

    file: str
    record: int | str | None
    message: str

    @classmethod
    def from_error(cls, error: DataError) -> Problem:
        where = f"field {error.field!r}: " if error.field else ""
        return cls(file=error.file or "", record=error.record, message=where + error.message)


class Reader:
    """Reads one public dataset layout under `root` and yields canonical records.

    Subclasses set `name` and implement `_read()`; they report a broken record by raising
    `DataError` from `_read` through `self.fail(...)`, which raises or records it as a problem
    according to `on_error`.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, root: str | Path, *, on_error: str = "raise", **options: Any) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise UsageError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, not {on_error!r}")
        self.root = Path(root)
        if not self.root.exists():
            raise UsageError(f"{self.root} does not exist: pass the folder that holds the {self.name} release")
        self.on_error = on_error
        self.options = options
        self.problems: list[Problem] = []

    def fail(self, error: DataError) -> None:
        """Raise `error`, or with on_error='skip' remember it and let the caller skip the record."""
        if self.on_error == "raise":
            raise error
        log.warning("skipping: %s", error)
        self.problems.append(Problem.from_error(error))

    def attempt(self, build: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`build(*args, **kwargs)`, or None after `fail` when it raises a `DataError`."""
        try:
            return build(*args, **kwargs)
        except DataError as error:
            self.fail(error)
            return None

    def csv_rows(self, path: Path, **kwargs: Any) -> Iterator[Row]:
        """The rows of a CSV file (see `parsing.read_csv`); an unreadable file or short row goes to `fail`."""
        for row in self.attempt(read_csv, path, **kwargs) or []:
            if row.error is None:
                yield row
            else:
                self.fail(row.error)

    def option(self, name: str, default: T, choices: tuple[T, ...] | None = None) -> T:
        """A reader option from the constructor's keyword arguments, checked against `choices`."""
        value = self.options.get(name, default)
        if choices is not None and value not in choices:
            raise UsageError(f"{self.name}: option {name} must be one of {', '.join(map(str, choices))}, "
                             f"not {value!r}")
        return value

    def records(self) -> Iterator[Record]:
        self.problems = []
        yield from self._read()

    def _read(self) -> Iterator[Record]:
        raise NotImplementedError

    def referenced_image_dir(self) -> Path | None:
        """The folder whose image files the records refer to (for 'never referenced' checks)."""
        return None


FORMATS: dict[str, type[Reader]] = {}


def register_format(cls: type[Reader]) -> type[Reader]:
    FORMATS[cls.name] = cls
    return cls


def open_dataset(format_name: str, root: str | Path, **options: Any) -> Reader:
    """The reader for `format_name` over `root`; unknown names list the known ones."""
    import medistill.data.formats  # noqa: F401  (registers every reader)

    try:
        reader_cls = FORMATS[format_name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise UsageError(f"unknown dataset format {format_name!r}; known formats: {known}") from None
    return reader_cls(root, **options)


