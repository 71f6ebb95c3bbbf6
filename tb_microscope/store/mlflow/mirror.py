"""Reading an MLflow run: `MlflowRunStore`, a `RunStore` over a mirror in the user's cache.

`sync()` fetches the index and whatever small files changed; snapshots are fetched when first
read, each once. What is fetched is checked against the index (a file's size and SHA-256, a
snapshot's size and checksum): a file caught half-uploaded or half-replaced is not used, and is
fetched again at the next sync.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

from ...errors import IncompatibleRunError, RunNotFoundError, StepNotFoundError
from ..local import RunStore, header_version, read_header, write_bytes_atomic
from ..paths import MANIFEST
from .common import (
    ARTIFACTS,
    MlflowUnavailableError,
    file_sha256,
    mirror_dir,
    mlflow_error,
    tracking_uri,
)
from .index import INDEX, Index, read_index, snapshot_rel

MAX_INDEX_BYTES = 64 << 20


class MlflowRunStore(RunStore):
    """A run's tb_microscope artifacts in MLflow, read through a local mirror (see the package's
    doc). Everything but the snapshots is fetched by `sync`; a snapshot when first read."""

    def __init__(self, mlflow_run_id: str, uri: str | None = None):
        self.uri = tracking_uri(uri)
        self.mlflow_run_id = mlflow_run_id
        super().__init__(mirror_dir(self.uri, mlflow_run_id))
        self._artifact_uri: str | None = None
        self._fetching = threading.Lock()
        self._index: tuple[tuple | None, Index | None] = (None, None)
        self.synced: float | None = None  # time.monotonic() of the last sync

    @property
    def name(self) -> str:
        return f"runs:/{self.mlflow_run_id}"

    def _repository(self):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self._artifact_uri, tracking_uri=self.uri)

    @contextlib.contextmanager
    def _temporary(self):
        folder = self.root / f".tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _download(self, rel: str, folder: Path) -> Path:
        try:
            return Path(self._repository().download_artifacts(f"{ARTIFACTS}/{rel}", str(folder)))
        except Exception as e:
            raise mlflow_error(e, f"{ARTIFACTS}/{rel} of {self.name}", self.uri) from e

    def sync(self) -> None:
        """Fetch the run's index and the small files that changed since the last sync."""
        from mlflow import MlflowClient

        try:
            info = MlflowClient(self.uri).get_run(self.mlflow_run_id).info
        except Exception as e:
            raise mlflow_error(e, f"MLflow run {self.mlflow_run_id}", self.uri) from e
        if info.lifecycle_stage == "deleted":
            raise RunNotFoundError(
                f"MLflow run {self.mlflow_run_id} ({info.run_name}) was deleted; restore it "
                f"(mlflow runs restore --run-id {self.mlflow_run_id}) to see it again"
            )
        self._artifact_uri = info.artifact_uri
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()  # a reader killed mid-download left them
        with self._temporary() as folder:
            try:
                path = self._download(INDEX, folder)
            except RunNotFoundError:
                path = None
            except MlflowUnavailableError as e:
                # an artifact store answers a missing file in its own way: look whether it is
                try:
                    listed = self._repository().list_artifacts(ARTIFACTS)
                except Exception:
                    raise e from None
                if any(f.path.endswith(INDEX) for f in listed):
                    raise
                path = None
            if path is None:
                raise RunNotFoundError(
                    f"MLflow run {self.mlflow_run_id} ({info.run_name}) holds no tb_microscope "
                    f"data (no {ARTIFACTS}/{INDEX} in its artifacts); log into it with "
                    "tb_microscope.Logger('mlflow', model, example_input=...)"
                )
            if path.stat().st_size > MAX_INDEX_BYTES:
                raise IncompatibleRunError(f"{ARTIFACTS}/{INDEX} of {self.name} is too large")
            index = Index.parse(path.read_bytes(), f"{ARTIFACTS}/{INDEX} of {self.name}")
            local = self.local_index()
            for name, meta in index.files.items():
                target = self.root / name
                if _matches(target, meta):
                    continue
                fetched = self._download(name, folder)
                if not _matches(fetched, meta):  # being replaced right now: at the next sync
                    old = local.files.get(name) if local else None
                    if old is None:
                        index.files.pop(name)
                    else:
                        index.files[name] = old
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(fetched, target)
        write_bytes_atomic(self.root / INDEX, index.to_bytes())  # (its own temporary folder)
        self.synced = time.monotonic()

    def local_index(self) -> Index | None:
        path = self.root / INDEX
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._index[0] != signature:
            self._index = (signature, read_index(path, str(path)))
        return self._index[1]

    def has_manifest(self) -> bool:
        index = self.local_index()
        return index is not None and MANIFEST in index.files and super().has_manifest()

    def steps(self) -> list[int]:
        index = self.local_index()
        return sorted(index.snapshots) if index else []

    def snapshot_version(self, step: int) -> str:
        index = self.local_index()
        if index is None or step not in index.snapshots:
            raise StepNotFoundError(self.missing_step_message(step))
        return index.snapshots[step]["version"]

    def fetch(self, step: int) -> Path:
        """The snapshot of `step` in the mirror, downloaded the first time."""
        path = self.snapshot_path(step)
        version = self.snapshot_version(step)
        with self._fetching:
            if path.is_file() and _snapshot_matches(path, version):
                return path
            if self._artifact_uri is None:
                self.sync()
            with self._temporary() as folder:
                fetched = self._download(snapshot_rel(step), folder)
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(fetched, path)
        return path

    def snapshot_header(self, step: int, weights: dict | None = None):
        self.fetch(step)
        return super().snapshot_header(step, weights)

    def read_snapshot(self, step: int, device="cpu", weights: dict | None = None):
        self.fetch(step)
        return super().read_snapshot(step, device, weights)

    def missing_step_message(self, step: int) -> str:
        return super().missing_step_message(step).replace(f"run '{self.run_dir}'", self.name)


def _matches(path: Path, meta: dict) -> bool:
    try:
        return path.stat().st_size == meta["size"] and file_sha256(path) == meta["sha256"]
    except OSError:
        return False


def _snapshot_matches(path: Path, version: str) -> bool:
    try:
        header = read_header(path)
    except (OSError, ValueError):
        return False
    return header_version(header, "") == version
