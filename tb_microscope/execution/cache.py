"""Rendered images and computed results on disk, keyed by everything that changes them.

Every key holds the run's id (the random id its Logger wrote) and the version of each snapshot it
was computed from (its checksum and size), never the run's path: a run deleted and logged again
under the same name, or a snapshot written again, never gets the old pictures.

A cached image is a PNG whose text chunk holds its key and its objective and activation values;
a computed result (a unit's dataset examples, weights or history) is a JSON file. They live in
`<run>/plugins/tb_microscope/cache/` when the run directory is writable, otherwise in the user's
cache directory (`$XDG_CACHE_HOME/tb_microscope/<run id>/`, else `~/.cache/...`), or under a
root given by the caller. Writes are atomic, so an interrupted render never leaves a
half-written file. A `DiskBudget` bounds the bytes of the caches it is given, evicting the
least recently used files first.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..optvis.engine import ENGINE_VERSION
from ..run import Run
from ..store.local import write_bytes_atomic
from ..store.paths import user_cache_root

CACHE = "cache"
RESULTS = "results"
_TOUCH_EVERY_S = 60.0  # how often a used file's mtime is brought up to date (its recency)


@functools.lru_cache(maxsize=1 << 16)
def _digest(key: RenderKey | ResultKey, run_id: str) -> str:
    """A cached file's name: a hash of its run, the engine and every field of its key. Kept
    for the keys last asked: the tab asks after every unit of its grid twice a second."""
    fields = {"run": run_id, "engine": ENGINE_VERSION, **asdict(key)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class RenderKey:
    """Everything that changes a rendered image; `version` is the snapshot's (see
    `Run.snapshot_version`), `image` numbers a unit's diversity images, `bands` are the
    channels shown as RGB (None: the model's own colours)."""

    step: int
    version: str
    node: str
    unit: int
    technique: str
    size: int
    iterations: int
    seed: int
    image: int = 0
    bands: tuple[int, ...] | None = None

    def digest(self, run_id: str) -> str:
        return _digest(self, run_id)


@dataclass(frozen=True)
class ResultKey:
    """Everything that changes a computed result: its kind (examples, weights, history), the
    unit, the options, and the (step, version) of every snapshot it reads."""

    kind: str
    node: str
    unit: int
    options: tuple[tuple[str, object], ...]
    snapshots: tuple[tuple[int, str], ...]

    def digest(self, run_id: str) -> str:
        return _digest(self, run_id)


@dataclass
class CachedImage:
    image: np.ndarray  # uint8 H x W x 3
    objective: float
    activation: float


def encode_png(key: RenderKey, image: np.ndarray, objective: float, activation: float) -> bytes:
    """A cached picture's bytes: the PNG with its key and values in a text chunk."""
    info = PngImagePlugin.PngInfo()
    meta = {
        "key": asdict(key),
        "engine": ENGINE_VERSION,
        "objective": float(objective),
        "activation": float(activation),
    }
    info.add_text("tb_microscope", json.dumps(meta))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def encode_picture(image: np.ndarray) -> bytes:
    """A PNG of uint8 H x W x 3 (or x 4: with transparency)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (made if missing). The probe file has a name of
    its own, so that two threads checking at once cannot remove each other's."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
        return True
    except OSError:
        return False


class DiskBudget:
    """Keeps the cache folders it tracks under `max_bytes` in all, deleting the least recently
    used files first. Recency survives restarts as each file's mtime, brought up to date (at
    most once a minute) when the file is used; a folder is scanned when it is first tracked.
    Files that other processes write into a tracked folder count from the next scan.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._files: OrderedDict[str, int] = OrderedDict()  # path -> size, oldest first
        self._touched: dict[str, float] = {}
        self._total = 0
        self._roots: set[str] = set()
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return self._total

    def track(self, root: Path) -> None:
        with self._lock:
            if str(root) in self._roots:
                return
            self._roots.add(str(root))
        found = []
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith((".png", ".json", ".npz")):
                    path = os.path.join(folder, name)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    found.append((st.st_mtime, path, st.st_size))
        with self._lock:
            for mtime, path, size in sorted(found):
                if path not in self._files:
                    self._files[path] = size
                    self._total += size
                    self._touched[path] = mtime
            self._shrink()

    def used(self, path: Path) -> None:
        key = str(path)
        now = time.time()
        with self._lock:
            if key not in self._files:
                return
            self._files.move_to_end(key)
            if now - self._touched.get(key, 0.0) < _TOUCH_EVERY_S:
                return
            self._touched[key] = now
        try:
            os.utime(key)
        except OSError:
            pass

    def added(self, path: Path, size: int) -> None:
        key = str(path)
        with self._lock:
            self._total += size - self._files.pop(key, 0)
            self._files[key] = size
            self._touched[key] = time.time()
            self._shrink()

    def _shrink(self) -> None:
        while self._total > self.max_bytes and len(self._files) > 1:
            path, size = self._files.popitem(last=False)
            self._total -= size
            self._touched.pop(path, None)
            try:
                os.unlink(path)
            except OSError:
                pass


class RenderCache:
    """The cache of one run; `root` overrides where it lives, `budget` bounds its bytes."""

    def __init__(
        self,
        run: Run,
        root: str | os.PathLike | None = None,
        budget: DiskBudget | None = None,
    ):
        self.run_id = run.id
        if root is not None:
            self.root = Path(root) / self.run_id
        else:
            self.root = run.store.root / CACHE
            if not _writable(self.root):
                self.root = user_cache_root() / self.run_id
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        if budget is not None:
            budget.track(self.root)

    def path(self, key: RenderKey) -> Path:
        return self.root / f"step-{key.step}" / f"{key.digest(self.run_id)}.png"

    def result_path(self, key: ResultKey) -> Path:
        return self.root / RESULTS / f"{key.digest(self.run_id)}.json"

    def __contains__(self, key: RenderKey) -> bool:
        return self.path(key).is_file()

    def read(self, path: Path) -> bytes | None:
        """A cached file's bytes, or None when it is missing (never rendered, or evicted)."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if self.budget is not None:
            self.budget.used(path)
        return data

    def _write(self, path: Path, data: bytes) -> Path:
        write_bytes_atomic(path, data)
        if self.budget is not None:
            self.budget.added(path, len(data))
        return path

    def get(self, key: RenderKey) -> CachedImage | None:
        data = self.read(self.path(key))
        if data is None:
            return None
        try:
            with Image.open(io.BytesIO(data)) as png:
                meta = json.loads(png.text["tb_microscope"])
                image = np.asarray(png.convert("RGB"))
        except (OSError, KeyError, ValueError):
            return None  # unreadable: render again
        return CachedImage(image, meta["objective"], meta["activation"])

    def put(self, key: RenderKey, image: np.ndarray, objective: float, activation: float) -> Path:
        return self.put_png(key, encode_png(key, image, objective, activation))

    def put_png(self, key: RenderKey, data: bytes) -> Path:
        """Store a picture `encode_png` made (elsewhere, say on a Ray actor)."""
        return self._write(self.path(key), data)

    def get_result(self, key: ResultKey) -> dict | None:
        data = self.read(self.result_path(key))
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    def put_result(self, key: ResultKey, result: dict) -> Path:
        return self._write(self.result_path(key), json.dumps(result).encode())

    def picture_path(self, key: ResultKey) -> Path:
        """Where the picture that goes with a computed result lies (an atlas's, say)."""
        return self.root / RESULTS / f"{key.digest(self.run_id)}.png"

    def put_picture(self, key: ResultKey, image: np.ndarray) -> Path:
        """Store a result's picture (uint8 H x W x 3, or x 4 with transparency) as a PNG."""
        return self._write(self.picture_path(key), encode_picture(image))

    def arrays_path(self, key: ResultKey) -> Path:
        return self.root / RESULTS / f"{key.digest(self.run_id)}.npz"

    def get_arrays(self, key: ResultKey) -> dict[str, np.ndarray] | None:
        """Named arrays stored by `put_arrays` (read without pickle), or None when missing or
        unreadable."""
        data = self.read(self.arrays_path(key))
        if data is None:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None

    def put_arrays(self, key: ResultKey, arrays: dict[str, np.ndarray]) -> Path:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return self._write(self.arrays_path(key), buffer.getvalue())
