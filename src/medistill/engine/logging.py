"""Run logging: a JSONL event log, and the library's `logging` setup used by the CLI."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from medistill.engine.distributed import launch_rank, main_only


def setup_logging(verbosity: int = 0) -> None:
    """Route the library's log records to stderr; the CLI calls this once. Under torchrun only rank 0 logs
    below WARNING."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    if launch_rank() != 0:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medistill")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


@main_only
def write_json(path: str | Path, data: Any) -> None:
    """Write strict JSON (NaN becomes null) atomically: temp file, then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


class JsonlLog:
    """Appends one JSON object per event to `log.jsonl`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @main_only
    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps(_jsonable({"event": event, **fields}), sort_keys=True, allow_nan=False)
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(line + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
