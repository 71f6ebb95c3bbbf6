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

A run's folder is untrusted (see docs/security.md): the cache never follows a symlink out of
it, reads no file through a symlink, and deletes only the files it wrote (`is_cache_file`).
A file it cannot read back is deleted, so that it is made again rather than reported done.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import stat
import struct
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, PngImagePlugin

from ..optvis.engine import ENGINE_VERSION
from ..run import Run
from ..store.local import remove_stale_staging, write_bytes_atomic
from ..store.paths import user_cache_root

CACHE = "cache"
RESULTS = "results"
MAX_FILE_BYTES = 1 << 30  # a larger file at a cached file's name is not one the cache wrote
_TOUCH_EVERY_S = 60.0  # how often a used file's mtime is brought up to date (its recency)
_CACHED_NAME = re.compile(r"^[0-9a-f]{32}\.(?:png|json|npz)$")  # a digest and its kind
_CACHE_FOLDER = re.compile(rf"^(?:step-\d+|{RESULTS})$")
T = TypeVar("T")
log = logging.getLogger(__name__)


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


def decode_picture(data: bytes) -> np.ndarray:
    """The pixels of a PNG `encode_picture` wrote (uint8 H x W x 3 or x 4, as it was)."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as png:
        return np.asarray(png)


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


def is_cache_file(path: str | os.PathLike) -> bool:
    """Whether `path` names a file the cache writes: 32 hexadecimal digits and .png, .json or
    .npz, in a `step-<n>` or `results` folder. The disk budget counts and deletes nothing else."""
    path = Path(path)
    return bool(_CACHED_NAME.match(path.name) and _CACHE_FOLDER.match(path.parent.name))


def _cache_folders(root: Path) -> list[Path]:
    """The `step-<n>` and `results` folders of a cache root: real folders, never a symlink."""
    try:
        with os.scandir(root) as entries:
            return [
                Path(entry.path)
                for entry in entries
                if _CACHE_FOLDER.match(entry.name) and entry.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return []


def _cached_files(root: Path) -> list[tuple[float, str, int]]:
    """(mtime, path, size) of every file the cache wrote under `root`: regular files with the
    cache's names (`is_cache_file`); no symlink is followed."""
    found = []
    for folder in _cache_folders(root):
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not _CACHED_NAME.match(entry.name):
                        continue
                    try:
                        if entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            found.append((st.st_mtime, entry.path, st.st_size))
                    except OSError:
                        continue
        except OSError:
            continue
    return found


def _delete(path: str) -> None:
    """Delete a file of the cache; never through a folder that has become a symlink since."""
    folder = os.path.dirname(path)
    if os.path.islink(folder) or os.path.islink(os.path.dirname(folder)):
        return
    with contextlib.suppress(OSError):
        os.unlink(path)


def _escape(plugin: Path, home: Path) -> str | None:
    """Why the cache folder `home` in a run's plugin folder would reach outside it (it, or a
    `step-<n>` or `results` folder in it, is a symlink, or it lies elsewhere), or None."""
    if os.path.islink(home):
        return f"{home} is a symlink"
    if not os.path.lexists(home):
        return None
    real, inside = os.path.realpath(home), os.path.realpath(plugin)
    if not real.startswith(inside + os.sep):
        return f"{home} lies outside the run's folder (in {real})"
    try:
        with os.scandir(home) as entries:
            for entry in entries:
                if _CACHE_FOLDER.match(entry.name) and entry.is_symlink():
                    return f"{entry.path} is a symlink"
    except OSError:
        pass  # not a folder, or unreadable: found unwritable next
    return None


def _read_regular(path: Path) -> tuple[bytes, int]:
    """The bytes and inode of the regular file at `path`, opened without following a symlink at
    its name (ELOOP) nor blocking on a FIFO; ValueError for anything but a regular file of at
    most MAX_FILE_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ValueError(f"{st.st_size:,} bytes, more than a cached file holds")
        return f.read(), st.st_ino


def _png(data: bytes) -> bytes:
    """`data` when it is a whole PNG (decoded to its last pixel); else raises."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as png:
        png.load()
    return data


def _cached_image(data: bytes) -> CachedImage:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as png:
        meta = json.loads(png.text["tb_microscope"])
        image = np.asarray(png.convert("RGB"))
    return CachedImage(image, float(meta["objective"]), float(meta["activation"]))


def _result(data: bytes) -> dict:
    result = json.loads(data)
    if not isinstance(result, dict):
        raise ValueError("not a JSON object")
    return result


def _arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


# What a cached file's check raises when the file is not what the cache wrote (truncated,
# empty, garbage): PIL raises SyntaxError and struct.error for some broken PNGs.
_UNREADABLE = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    EOFError,
    SyntaxError,
    struct.error,
    zipfile.BadZipFile,
    Image.DecompressionBombError,
)
_CHECKS: dict[str, Callable[[bytes], object]] = {".png": _png, ".json": _result, ".npz": _arrays}


class DiskBudget:
    """Keeps the cache folders it tracks under `max_bytes` in all, deleting the least recently
    used files first. Recency survives restarts as each file's mtime, brought up to date (at
    most once a minute) when the file is used; a folder is scanned when it is first tracked.
    Files that other processes write into a tracked folder count from the next scan.

    Only the files the cache writes are counted and deleted (`is_cache_file`): anything else
    in a cache folder is left alone, and no symlink is followed, to a folder or a file.
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
        if os.path.islink(root):
            return  # never walked through
        found = _cached_files(root)
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
            os.utime(key, follow_symlinks=False)
        except OSError:
            pass

    def added(self, path: Path, size: int) -> None:
        if not is_cache_file(path):
            return
        key = str(path)
        with self._lock:
            self._total += size - self._files.pop(key, 0)
            self._files[key] = size
            self._touched[key] = time.time()
            self._shrink()

    def removed(self, path: Path) -> None:
        """Forget a file the cache deleted itself."""
        with self._lock:
            self._total -= self._files.pop(str(path), 0)
            self._touched.pop(str(path), None)

    def _shrink(self) -> None:
        while self._total > self.max_bytes and len(self._files) > 1:
            path, size = self._files.popitem(last=False)
            self._total -= size
            self._touched.pop(path, None)
            _delete(path)


class RenderCache:
    """The cache of one run; `root` overrides where it lives, `budget` bounds its bytes.

    A cache in the run's folder never reaches outside it: when its folder, or a `step-<n>` or
    `results` folder in it, is a symlink (found when the cache is opened, or later when a file
    is read or written), the cache moves to the user cache, as for a read-only run, and says so
    once in the log. A file is read without following a symlink at its name. One that is
    missing reads as None; one that cannot be read or is not what the cache wrote (truncated,
    empty, a symlink) is deleted and reads as None, so that it is made again. Staging folders
    of writes that a killed process left are swept when the cache is opened.
    """

    def __init__(
        self,
        run: Run,
        root: str | os.PathLike | None = None,
        budget: DiskBudget | None = None,
    ):
        self.run_id = run.id
        self.budget = budget
        self._run_name = run.name
        self._lock = threading.Lock()
        self._home: Path | None = None  # the cache folder in the run, when it was considered
        if root is not None:
            self.root = Path(root) / self.run_id
        else:
            self._home = self.root = run.store.root / CACHE
            escape = _escape(run.store.root, self._home)
            if escape is not None:
                self._move(escape)
            elif not _writable(self.root):
                self.root = user_cache_root() / self.run_id
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in [self.root, *_cache_folders(self.root)]:
            remove_stale_staging(folder)
        if budget is not None:
            budget.track(self.root)

    def _move(self, why: str) -> None:
        """Move a cache that would reach outside its run to the user cache; say so once."""
        with self._lock:
            if self.root != self._home:
                return
            self.root = user_cache_root() / self.run_id
            self.root.mkdir(parents=True, exist_ok=True)
        log.warning(
            "the render cache of run '%s' would reach outside the run: %s. Its pictures and "
            "results are cached in %s instead.",
            self._run_name,
            why,
            self.root,
        )
        if self.budget is not None:
            self.budget.track(self.root)

    def _place(self, path: Path) -> Path:
        """Where `path`, a file of this cache, is read or written: itself, or its place in the
        user cache once the cache has moved there (which it does when a folder between the
        run's plugin folder and the file has become a symlink)."""
        home = self._home
        if home is None or path.parent.parent != home:
            return path
        if self.root == home:
            for folder in (home, path.parent):
                if os.path.islink(folder):
                    self._move(f"{folder} is a symlink")
                    break
            else:
                return path
        return self.root / path.parent.name / path.name

    def path(self, key: RenderKey) -> Path:
        return self.root / f"step-{key.step}" / f"{key.digest(self.run_id)}.png"

    def result_path(self, key: ResultKey) -> Path:
        return self.root / RESULTS / f"{key.digest(self.run_id)}.json"

    def __contains__(self, key: RenderKey) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._place(self.path(key))).st_mode)
        except OSError:
            return False

    def _load(self, path: Path, decode: Callable[[bytes], T]) -> T | None:
        """A cached file, decoded; None when it is missing, or was unreadable (then deleted)."""
        path = self._place(path)
        try:
            data, inode = _read_regular(path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None  # never made, or evicted
            self._discard(path, None, e)  # a symlink (ELOOP), or unreadable
            return None
        except ValueError as e:
            self._discard(path, None, e)
            return None
        try:
            value = decode(data)
        except _UNREADABLE as e:
            self._discard(path, inode, e)
            return None
        if self.budget is not None:
            self.budget.used(path)
        return value

    def _discard(self, path: Path, inode: int | None, why: Exception) -> None:
        """Delete an unreadable file of the cache (only the one that was read: not a whole file
        written since), so that it is made again."""
        try:
            if inode is None or os.lstat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning(
                "the cached file %s of run '%s' is unreadable (%s) and cannot be deleted (%s)",
                path,
                self._run_name,
                why,
                e,
            )
            return
        if self.budget is not None:
            self.budget.removed(path)
        log.warning(
            "the cached file %s of run '%s' was unreadable (%s: %s); deleted, to be made again",
            path,
            self._run_name,
            type(why).__name__,
            why,
        )

    def read(self, path: Path) -> bytes | None:
        """A cached file's bytes, checked whole (a PNG decoded, JSON parsed, arrays loaded); None
        when it is missing (never made, or evicted) or was unreadable (then it was deleted)."""
        check = _CHECKS[path.suffix]

        def checked(data: bytes) -> bytes:
            check(data)
            return data

        return self._load(path, checked)

    def _write(self, path: Path, data: bytes) -> Path:
        path = self._place(path)
        write_bytes_atomic(path, data)
        if self.budget is not None:
            self.budget.added(path, len(data))
        return path

    def get(self, key: RenderKey) -> CachedImage | None:
        return self._load(self.path(key), _cached_image)

    def put(self, key: RenderKey, image: np.ndarray, objective: float, activation: float) -> Path:
        return self.put_png(key, encode_png(key, image, objective, activation))

    def put_png(self, key: RenderKey, data: bytes) -> Path:
        """Store a picture `encode_png` made (elsewhere, say on a Ray actor)."""
        return self._write(self.path(key), data)

    def get_result(self, key: ResultKey) -> dict | None:
        return self._load(self.result_path(key), _result)

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
        return self._load(self.arrays_path(key), _arrays)

    def put_arrays(self, key: ResultKey, arrays: dict[str, np.ndarray]) -> Path:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return self._write(self.arrays_path(key), buffer.getvalue())
