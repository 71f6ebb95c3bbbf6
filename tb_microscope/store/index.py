"""`index.json`: what an uploader has uploaded of a run, complete, and the file checksums it
compares.

An uploader (`upload.py`) keeps it in its staging folder, the record of what reached the remote
side. MLflow's artifact stores have no atomic rename, so there it is uploaded too, after the files
it lists, and MLflow readers use nothing else (see `mlflow/`). Object storage puts each object
whole, so readers of an fsspec URL list the objects instead (see `remote/`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..errors import IncompatibleRunError
from .paths import EXPORTED_ARCHITECTURE, MANIFEST, PICKLED_ARCHITECTURE, PROBE, SNAPSHOTS

INDEX = "index.json"
INDEX_FORMAT = "tb_microscope.mlflow-index"
SMALL_FILES = (EXPORTED_ARCHITECTURE, PICKLED_ARCHITECTURE, PROBE, MANIFEST)  # manifest last


def snapshot_rel(step: int) -> str:
    return f"{SNAPSHOTS}/step-{step:09d}.safetensors"


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at `path`, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Index:
    """What a run's uploaded tb_microscope files hold, complete: the small files (name ->
    size, sha256) and the snapshots (step -> size, version as `RunStore.snapshot_version`)."""

    run_id: str
    files: dict[str, dict] = dataclasses.field(default_factory=dict)
    snapshots: dict[int, dict] = dataclasses.field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": INDEX_FORMAT,
                "version": 1,
                "run_id": self.run_id,
                "files": self.files,
                "snapshots": {str(s): v for s, v in sorted(self.snapshots.items())},
            },
            indent=1,
        ).encode()

    @classmethod
    def parse(cls, raw: bytes, source: str) -> Index:
        def bad(why: str) -> IncompatibleRunError:
            return IncompatibleRunError(
                f"{source} is broken ({why}); the run's tb_microscope artifacts were damaged or "
                "written by another program: log the run again"
            )

        try:
            data = json.loads(raw)
        except ValueError as e:
            raise bad(f"not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise bad("not a tb_microscope index")
        if not isinstance(data.get("version"), int) or data["version"] > 1:
            raise bad("written by a newer tb_microscope; upgrade tb-microscope")
        files, snapshots = data.get("files"), data.get("snapshots")
        if not isinstance(data.get("run_id"), str) or not isinstance(files, dict):
            raise bad("no run id or file list")
        for name, meta in files.items():
            if name not in SMALL_FILES:
                raise bad(f"it lists {name!r}, which is not one of ours")
            if not (
                isinstance(meta, dict)
                and isinstance(meta.get("size"), int)
                and isinstance(meta.get("sha256"), str)
            ):
                raise bad(f"the entry of {name} has no size or sha256")
        if not isinstance(snapshots, dict):
            raise bad("no snapshot list")
        steps = {}
        for step, meta in snapshots.items():
            if not (
                step.isdigit()
                and isinstance(meta, dict)
                and isinstance(meta.get("size"), int)
                and isinstance(meta.get("version"), str)
            ):
                raise bad(f"its snapshot entry {step!r} is malformed")
            steps[int(step)] = meta
        return cls(data["run_id"], files, steps)


def read_index(path: Path, source: str) -> Index | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return Index.parse(raw, source)
