"""The on-disk format of a run, read and written through this module by every side.

A run's data lives in ``<run>/plugins/tb_microscope/``::

    manifest.json          format version, model summary, nodes, edges, input spec, probe
    model.pt2              the architecture, captured once with torch.export
    model.pkl              ... or, when export failed, a pickled architecture (weights on `meta`)
    probe/images.safetensors   optional uint8 probe images, N x C x H x W
    snapshots/step-000001200.safetensors   the weights at one step

The snapshot directory is the snapshot index: every file is renamed into place only once it is
complete and fsynced, so a listing is always consistent, even after a crash. (DESIGN.md put the
index in the manifest; a second copy there could disagree with the files after a kill, so the
listing is the one source of truth and the manifest is written once per run.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CorruptSnapshotError, IncompatibleRunError, RunNotFoundError, StepNotFoundError

PLUGIN_NAME = "tb_microscope"
FORMAT = "tb_microscope.run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXPORTED_ARCHITECTURE = "model.pt2"
PICKLED_ARCHITECTURE = "model.pkl"
SNAPSHOTS = "snapshots"
PROBE = "probe/images.safetensors"
SUMMARY_TAG = "tb_microscope/snapshot"

_SNAPSHOT_NAME = re.compile(r"^step-(\d{9,})\.safetensors$")
_STAGING_NAME = re.compile(r"^\.tmp-(\d+)-\d+$")  # .tmp-<pid>-<thread>
_ALIASES_KEY = "tb_microscope.aliases"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_CRC_KEY = "tb_microscope.crc32"


def plugin_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "plugins" / PLUGIN_NAME


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file in the same folder: fsync, rename, fsync the folder.

    Readers see either the old file or the whole new one. The temporary file lives in a hidden
    folder named after this process and thread (`.tmp-<pid>-<thread>/`, where writers' own
    temporaries land too); it is removed on any error, KeyboardInterrupt included, and one left
    by a killed process is swept by `RunStore.remove_stale_temporaries`.
    """
    # One staging folder per thread: a folder shared by two threads could be removed by one
    # while the other is about to write into it.
    staging = path.parent / f".tmp-{os.getpid()}-{threading.get_ident()}"
    staging.mkdir(parents=True, exist_ok=True)
    temp = staging / path.name  # keeps the suffix: torch.export.save wants ".pt2"
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


class RunStore:
    """Files of one run's tb_microscope data; knows names and formats, nothing about models."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.root = plugin_dir(run_dir)

    # manifest -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        if not self.has_manifest():
            raise RunNotFoundError(
                f"'{self.run_dir}' holds no tb_microscope data (no {self.manifest_path}). "
                "Pass the run directory given to tb_microscope.Logger, or log a run first."
            )
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise IncompatibleRunError(
                f"the manifest of run '{self.run_dir}' is unreadable ({self.manifest_path}: {e})."
            ) from e
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("version"), int):
            raise IncompatibleRunError(f"{self.manifest_path} is not a tb_microscope manifest.")
        if manifest["version"] > FORMAT_VERSION:
            raise IncompatibleRunError(
                f"run '{self.run_dir}' was written in format version {manifest['version']}, newer "
                f"than this tb_microscope reads ({FORMAT_VERSION}); upgrade tb-microscope."
            )
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, **manifest}
        write_bytes_atomic(self.manifest_path, json.dumps(manifest, indent=1).encode())

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

    def read_snapshot(
        self, step: int, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The weights at `step`, tied names restored, verified against the stored checksum."""
        path = self.snapshot_path(step)
        if not path.is_file():
            raise StepNotFoundError(self.missing_step_message(step))
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads(meta[_ALIASES_KEY])
            expected = meta[_CRC_KEY]
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

    def read_probe(self) -> torch.Tensor | None:
        path = self.root / PROBE
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("images")

    # housekeeping ---------------------------------------------------------------------------
    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary folders that processes killed mid-write left behind."""
        removed = []
        for folder in (self.root, self.root / SNAPSHOTS, (self.root / PROBE).parent):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                m = _STAGING_NAME.match(entry.name)
                if m and not _process_alive(int(m.group(1))):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        return removed
