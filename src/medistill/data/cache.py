"""The optional preprocessed-image cache: decoded, resized images as a memory-mapped uint8 array.

A cache folder holds one sub-folder per preprocessing (`size`, `frame` and the cache format version,
hashed), each with `images.u8` (a raw (capacity, size, size) uint8 array) and `index.json` (source key ->
slot). A source's key hashes its resolved path, size and modification time, so an edited file is decoded
again. The first epoch decodes and stores; later epochs read a memory-mapped slice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from medistill.data.imaging import load_image
from medistill.errors import UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_GROWTH = 256  # slots added at a time


def source_key(path: str | Path) -> str:
    """A hash of the source file's identity: resolved path, size in bytes, modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]


class ImageCache:
    """`load(path)` returns `load_image(path, size=size, frame=frame)` quantised to 8 bits, from the cache
    when present. Call `flush()` (or use as a context manager) to persist the index."""

    def __init__(self, directory: str | Path, *, size: int, frame: int | None = None) -> None:
        if size <= 0:
            raise UsageError(f"cache image size must be positive, not {size}")
        self.size, self.frame = size, frame
        preprocessing = json.dumps({"size": size, "frame": frame, "version": FORMAT_VERSION}, sort_keys=True)
        self.folder = Path(directory) / hashlib.sha256(preprocessing.encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "preprocessing.json").write_text(preprocessing)
        self._data_path = self.folder / "images.u8"
        self._index_path = self.folder / "index.json"
        self.index: dict[str, int] = json.loads(self._index_path.read_text()) if self._index_path.exists() else {}
        self._array = self._map(max(len(self.index), 1))
        self._dirty = False

    def _map(self, capacity: int) -> np.memmap:
        slot_bytes = self.size * self.size
        needed = capacity * slot_bytes
        if not self._data_path.exists() or self._data_path.stat().st_size < needed:
            with self._data_path.open("ab") as handle:
                handle.truncate(needed)
        slots = self._data_path.stat().st_size // slot_bytes
        return np.memmap(self._data_path, dtype=np.uint8, mode="r+", shape=(slots, self.size, self.size))

    def load(self, path: str | Path) -> np.ndarray:
        key = source_key(path)
        slot = self.index.get(key)
        if slot is not None:
            return self._array[slot].astype(np.float32) / 255.0
        image = load_image(path, size=self.size, frame=self.frame)
        quantised = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        slot = len(self.index)
        if slot >= self._array.shape[0]:
            self._array.flush()
            self._array = self._map(slot + _GROWTH)
        self._array[slot] = quantised
        self.index[key] = slot
        self._dirty = True
        return quantised.astype(np.float32) / 255.0

    def flush(self) -> None:
        if not self._dirty:
            return
        self._array.flush()
        temporary = self._index_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.index))
        os.replace(temporary, self._index_path)
        self._dirty = False
        log.debug("image cache %s: %d images", self.folder, len(self.index))

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()
