"""Reading an MLflow run: `MlflowRunStore`, a `RunStore` over a mirror in the user's cache.

`sync()` fetches the index and whatever small files changed; snapshots are fetched when first
read, each once (the shared `MirrorStore`, `store/mirror.py`, bounded in bytes). What is fetched
is checked against the index (a file's size and SHA-256, a snapshot's size and checksum): a file
caught half-uploaded or half-replaced is not used, and is fetched again at the next sync.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ...errors import IncompatibleRunError, RunNotFoundError, StepNotFoundError
from ..index import INDEX, Index, file_sha256, read_index, snapshot_rel
from ..local import header_version, read_header, write_bytes_atomic
from ..mirror import MirrorStore, snapshot_budget
from ..paths import MANIFEST
from .common import ARTIFACTS, MlflowUnavailableError, mirror_dir, mlflow_error, tracking_uri

MAX_INDEX_BYTES = 64 << 20


class MlflowRunStore(MirrorStore):
    """A run's tb_microscope artifacts in MLflow, read through a local mirror (see the package's
    doc). Everything but the snapshots is fetched by `sync`; a snapshot when first read."""

    def __init__(self, mlflow_run_id: str, uri: str | None = None):
        self.uri = tracking_uri(uri)
        self.mlflow_run_id = mlflow_run_id
        super().__init__(mirror_dir(self.uri, mlflow_run_id), snapshot_budget("mlflow"))
        self._artifact_uri: str | None = None
        self._index: tuple[tuple | None, Index | None] = (None, None)
        self.synced: float | None = None  # time.monotonic() of the last sync

    @property
    def name(self) -> str:
        return f"runs:/{self.mlflow_run_id}"

    def _repository(self):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self._artifact_uri, tracking_uri=self.uri)

    def _download_artifact(self, rel: str, folder: Path) -> Path:
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
        with self.temporary() as folder:
            try:
                path = self._download_artifact(INDEX, folder)
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
                fetched = self._download_artifact(name, folder)
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

    def _holds(self, path: Path, step: int) -> bool:
        return path.is_file() and _snapshot_matches(path, self.snapshot_version(step))

    def _download(self, step: int, folder: Path) -> Path:
        if self._artifact_uri is None:
            self.sync()
        return self._download_artifact(snapshot_rel(step), folder)


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
