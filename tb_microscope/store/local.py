"""A run on a local disk (`RunStore`): its files, written atomically and checked when read.

A run's data lives in ``<run>/plugins/tb_microscope/`` (the names are in `paths.py`)::

    manifest.json          the `Manifest` (`manifest.py`): run id, model, nodes, edges, input, probe
    model.pt2              the exported program, without weights (see `architecture.py`); in
                           runs of format version 1, torch.export.save's archive
    model.pkl              ... or, when export failed, a pickled architecture (weights on `meta`)
    probe/images.safetensors   optional uint8 probe images, N x C x H x W
    snapshots/step-000001200.safetensors   the weights at one step

The snapshot directory is the snapshot index: every file is renamed into place only once it is
complete and fsynced, so a listing is always consistent, even after a crash. (DESIGN.md put the
index in the manifest; a second copy there could disagree with the files after a kill, so the
listing is the one source of truth and the manifest is written once per run.)

Everything read from a run is checked before it is used: the manifest against its schema
(`Manifest.parse`), every safetensors file's header against its size and the manifest's weights
(`read_header`), before any tensor is read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CorruptSnapshotError, IncompatibleRunError, RunNotFoundError, StepNotFoundError
from ..lru import LRU
from .manifest import MAX_MANIFEST_BYTES, Manifest, whole_numbers
from .paths import MANIFEST, PROBE, SNAPSHOTS, plugin_dir

_SNAPSHOT_NAME = re.compile(r"^step-(\d{9,})\.safetensors$")
_STAGING_NAME = re.compile(r"^\.tmp-(\d+)-\d+$")  # .tmp-<pid>-<thread>
_ALIASES_KEY = "tb_microscope.aliases"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_CRC_KEY = "tb_microscope.crc32"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_PROBE_BYTES = 1 << 30
MAX_PROBE_IMAGES = 100_000


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file in the same folder: fsync, rename, fsync the folder.

    Readers see either the old file or the whole new one. The temporary file lives in a hidden
    folder named after this process and thread (`.tmp-<pid>-<thread>/`, where writers' own
    temporaries land too); it is removed on any error, KeyboardInterrupt included, and one left
    by a killed process is swept by `remove_stale_staging`. The rename replaces whatever is at
    `path`: a symlink there is replaced itself, its target never written. A symlink found at the
    staging folder's name is removed, not written through.
    """
    # One staging folder per thread: a folder shared by two threads could be removed by one
    # while the other is about to write into it.
    staging = path.parent / f".tmp-{os.getpid()}-{threading.get_ident()}"
    temp = staging / path.name  # keeps the suffix: torch.export.save wants ".pt2"
    _make_staging(staging)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_UMASK)  # some writers create 0600 files; readers may be others
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        with contextlib.suppress(OSError):
            staging.rmdir()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda temp: temp.write_bytes(data))


def _make_staging(staging: Path) -> None:
    """Make `atomic_write`'s staging folder: a real folder of its own, never a symlink planted
    at its name (which would send the temporary file elsewhere)."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.mkdir()
    except FileExistsError:
        if stat.S_ISDIR(os.lstat(staging).st_mode):
            return  # this thread's own, left by an earlier write
        staging.unlink()
        staging.mkdir()


def remove_stale_staging(folder: Path) -> list[Path]:
    """Delete the staging folders (`.tmp-<pid>-<thread>`) of `atomic_write` that processes
    killed mid-write left in `folder`: those whose process is gone. A symlink of that name is
    removed itself, never followed."""
    try:
        entries = list(os.scandir(folder))
    except OSError:  # missing, or not a folder
        return []
    removed = []
    for entry in entries:
        m = _STAGING_NAME.match(entry.name)
        if not m or _process_alive(int(m.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        removed.append(Path(entry.path))
    return removed


# --- safetensors headers ---------------------------------------------------------------------

_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}  # fmt: skip


@dataclass(frozen=True)
class Header:
    """A safetensors file's header, checked: every tensor's dtype, shape and byte range fit."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (torch dtype name, shape)
    metadata: dict[str, str]
    size: int  # the file's size in bytes


def header_version(header: Header, fallback: str) -> str:
    """A snapshot's version from its header: its checksum and size (`fallback` stands in for
    the checksum of a file written without one)."""
    return f"{header.metadata.get(_CRC_KEY) or fallback}-{header.size}"


def read_header(path: Path, max_bytes: int | None = None) -> Header:
    """Read and check a safetensors header without reading any tensor.

    Raises ValueError saying what is wrong: a header longer than the file or than safetensors
    allows, an unknown dtype, a byte range that does not match its shape or overlaps another,
    data that does not fill the file exactly, or a file larger than `max_bytes`.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"the file is {size:,} bytes, more than the {max_bytes:,} allowed")
        if size < 8:
            raise ValueError(f"the file is {size} bytes, too short for a header")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"its header claims {length:,} bytes of a {size:,}-byte file")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise ValueError(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("its metadata is not a map of strings")
    tensors, ranges = {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise ValueError(f"tensor {name!r} has no known dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not whole_numbers(shape) or not whole_numbers(offsets) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r} has a malformed shape or byte range")
        begin, end = offsets
        if end - begin != math.prod(shape) * _DTYPES[info["dtype"]]:
            raise ValueError(f"tensor {name!r}: its byte range does not match its shape")
        tensors[name] = (_TORCH_DTYPES[info["dtype"]], tuple(shape))
        ranges.append((begin, end))
    ranges.sort()
    covered = 0
    for begin, end in ranges:
        if begin != covered:
            raise ValueError("its tensors' byte ranges overlap or leave gaps")
        covered = end
    if covered != size - 8 - length:
        raise ValueError(
            f"its tensors hold {covered:,} bytes but the file has {size - 8 - length:,} after "
            "the header (truncated, or extended)"
        )
    return Header(tensors, metadata, size)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        raw = tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        crc = zlib.crc32(raw, zlib.crc32(name.encode(), crc))
    return f"{crc:08x}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten: (inode, size, mtime)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class RunStore:
    """Files of one run's tb_microscope data; knows names and formats, nothing about models."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.root = plugin_dir(run_dir)
        self._versions: LRU[str] = LRU(max_items=4096)  # (step, file signature) -> version

    # manifest -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def manifest_signature(self) -> tuple[int, int, int] | None:
        return _signature(self.manifest_path)

    def read_manifest(self) -> Manifest:
        if not self.has_manifest():
            raise RunNotFoundError(
                f"'{self.run_dir}' holds no tb_microscope data (no {self.manifest_path}). "
                "Pass the run directory given to tb_microscope.Logger, or log a run first."
            )
        try:
            with open(self.manifest_path, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise IncompatibleRunError(
                f"the manifest of run '{self.run_dir}' is unreadable ({self.manifest_path}: {e})."
            ) from e
        if len(raw) > MAX_MANIFEST_BYTES:
            raise IncompatibleRunError(
                f"{self.manifest_path} is larger than {MAX_MANIFEST_BYTES >> 20} MB; "
                "it is not a tb_microscope manifest"
            )
        return Manifest.parse(raw, str(self.manifest_path))

    def write_manifest(self, manifest: Manifest) -> None:
        write_bytes_atomic(self.manifest_path, json.dumps(manifest.to_json(), indent=1).encode())

    # snapshots ------------------------------------------------------------------------------
    def snapshot_path(self, step: int) -> Path:
        return self.root / SNAPSHOTS / f"step-{step:09d}.safetensors"

    def steps(self) -> list[int]:
        """Every step with a complete snapshot, ascending."""
        try:
            names = os.listdir(self.root / SNAPSHOTS)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_SNAPSHOT_NAME.match, names) if m)

    def write_snapshot(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        aliases: dict[str, str],
        metadata: dict[str, str],
    ) -> int:
        """Write one step's weights atomically; `aliases` maps a tied name to the stored name.

        Returns the file's size in bytes.
        """
        meta = {
            **metadata,
            "step": str(step),
            _ALIASES_KEY: json.dumps(aliases),
            _CRC_KEY: _checksum(tensors),
        }
        path = self.snapshot_path(step)
        atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=meta))
        return path.stat().st_size

    def snapshot_header(self, step: int, weights: dict | None = None) -> Header:
        """The snapshot's checked header; with the manifest's `weights`, also checked to hold
        exactly those tensors, each of its dtype and shape."""
        path = self.snapshot_path(step)
        if not path.is_file():
            if path.exists():  # listed as a step, and not a file: a directory, say
                raise self._corrupt(step, path, "it is not a file")
            raise StepNotFoundError(self.missing_step_message(step))
        try:
            header = read_header(path)
            aliases = json.loads(header.metadata.get(_ALIASES_KEY, "{}"))
            if not isinstance(aliases, dict) or not all(
                isinstance(v, str) and v in header.tensors for v in aliases.values()
            ):
                raise ValueError("its aliases name tensors it does not hold")
        except (OSError, ValueError) as e:
            raise self._corrupt(step, path, str(e)) from e
        if weights is not None:
            held = {**header.tensors, **{a: header.tensors[s] for a, s in aliases.items()}}
            wrong = sorted(set(held) ^ set(weights)) or sorted(
                k for k in held if held[k] != tuple(weights[k])
            )
            if wrong:
                raise self._corrupt(
                    step,
                    path,
                    "its tensors do not match the run's model (names, dtypes or shapes differ at "
                    f"{', '.join(wrong[:5])}{' …' if len(wrong) > 5 else ''})",
                )
        return header

    def snapshot_version(self, step: int) -> str:
        """What identifies this step's snapshot's content: its checksum and size, read from its
        header (once per file version). Caches key on it, so a rewritten snapshot never gets the
        pictures of the old one."""
        path = self.snapshot_path(step)
        signature = _signature(path)
        if signature is None:
            raise StepNotFoundError(self.missing_step_message(step))
        key = (step, signature)
        version = self._versions.get(key)
        if version is None:
            header = self.snapshot_header(step)
            version = self._versions.put(key, header_version(header, f"m{signature[2]}"))
        return version

    def read_snapshot(
        self, step: int, device: str | torch.device = "cpu", weights: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """The weights at `step`, tied names restored, verified against the stored checksum (and
        first, the header against the manifest's `weights`, when given)."""
        path = self.snapshot_path(step)
        header = self.snapshot_header(step, weights)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads(header.metadata[_ALIASES_KEY])
            expected = header.metadata[_CRC_KEY]
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise self._corrupt(step, path, f"{type(e).__name__}: {e}") from e
        if _checksum(tensors) != expected:
            raise self._corrupt(
                step, path, "its contents do not match the checksum written with it"
            )
        if str(device) != "cpu":
            tensors = {name: t.to(device) for name, t in tensors.items()}
        for alias, stored in aliases.items():
            tensors[alias] = tensors[stored]
        return tensors

    def _corrupt(self, step: int, path: Path, why: str) -> CorruptSnapshotError:
        return CorruptSnapshotError(
            f"the snapshot of step {step} in run '{self.run_dir}' is corrupt or truncated "
            f"({path}: {why}). The other steps are unaffected; delete this file to drop the step."
        )

    def missing_step_message(self, step: int) -> str:
        steps = self.steps()
        listed = (
            ", ".join(map(str, steps))
            if len(steps) <= 20
            else (f"{', '.join(map(str, steps[:10]))} … {', '.join(map(str, steps[-5:]))}")
        )
        return f"step {step} is not logged in run '{self.run_dir}'; steps: {listed or 'none yet'}"

    # probe ----------------------------------------------------------------------------------
    def write_probe(self, images: torch.Tensor) -> None:
        atomic_write(self.root / PROBE, lambda temp: save_file({"images": images}, str(temp)))

    def read_probe(self, channels: int | None = None) -> torch.Tensor | None:
        """The probe images (uint8, N x C x ...), checked before they are read: one uint8 tensor
        of at most MAX_PROBE_IMAGES images, with the model's `channels`."""
        path = self.root / PROBE
        if not path.is_file():
            return None
        try:
            header = read_header(path, MAX_PROBE_BYTES)
            dtype, shape = header.tensors.get("images", (None, ()))
            if set(header.tensors) != {"images"} or dtype != "uint8" or len(shape) < 2:
                raise ValueError("it must hold one uint8 tensor 'images' of N x C x ...")
            if shape[0] > MAX_PROBE_IMAGES or (channels is not None and shape[1] != channels):
                raise ValueError(
                    f"it holds {shape[0]} images of {shape[1]} channels; at most "
                    f"{MAX_PROBE_IMAGES} of {channels} are allowed"
                )
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("images")
        except (OSError, ValueError, SafetensorError) as e:
            raise CorruptSnapshotError(
                f"the probe images of run '{self.run_dir}' are unreadable ({path}: {e}); "
                "delete the file to go without dataset examples"
            ) from e

    # housekeeping ---------------------------------------------------------------------------
    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary folders that processes killed mid-write left behind."""
        folders = (self.root, self.root / SNAPSHOTS, (self.root / PROBE).parent)
        return [path for folder in folders for path in remove_stale_staging(folder)]
