"""Errors a user can act on. The CLI prints their message on one line; `exit_code` picks the status."""

from __future__ import annotations


class MedistillError(Exception):
    """A failure with a message that says what to do; exit status 1."""

    exit_code = 1


class UsageError(MedistillError):
    """A bad flag, value, path or config: the user's call must change; exit status 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A recipe or `--set` override that does not fit the schema."""


class DataError(MedistillError):
    """Input data that cannot be read as promised, located by file, record and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        record: int | str | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.record = record
        self.field = field
        where = [part for part in (
            file,
            None if record is None else f"record {record}",
            None if field is None else f"field {field!r}",
        ) if part]
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
