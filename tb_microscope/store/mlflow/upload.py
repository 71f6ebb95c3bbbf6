"""Writing an MLflow run: the Logger's uploader (`ArtifactUploader`), and what a Logger that goes
on with an MLflow run reads first (`adopt_remote`, `uploaded_steps`).

The Logger's writer writes into a local staging run directory as usual; the shared `Uploader`
(`store/upload.py`) uploads each finished file and then the index, and deletes a staged snapshot
once the index that lists it is uploaded. While the tracking server is unreachable the snapshots
wait on disk (bounded by the Logger's `backlog_mb`), retried with backoff; training never waits.
"""

from __future__ import annotations

import os
import threading

from ..index import INDEX
from ..local import RunStore
from ..paths import MANIFEST
from ..upload import Uploader, adopt, uploaded_steps
from .common import ARTIFACTS, TAG
from .mirror import MlflowRunStore

__all__ = ["ADOPT_TIMEOUT_S", "ArtifactUploader", "adopt_remote", "uploaded_steps"]
ADOPT_TIMEOUT_S = 20.0  # how long a new Logger waits to read what its MLflow run holds


def adopt_remote(store: RunStore, mlflow_run_id: str, uri: str, timeout: float | None = None):
    """When the staging `store` is new and the MLflow run already holds our data (logged from
    another machine, or before this machine's cache was cleared), copy the run's index and small
    files into it, so that the Logger goes on with that run (its run id, its logged steps; a
    different model refused) rather than replacing its index. Gives up after `timeout` seconds
    (default: TB_MICROSCOPE_MLFLOW_ADOPT_TIMEOUT, else ADOPT_TIMEOUT_S): the uploader then
    checks the run's tag before uploading anything. Returns the run id adopted, or None."""
    if store.has_manifest() or (store.root / INDEX).exists():
        return None
    found: dict = {}

    def read() -> None:
        try:
            mirror = MlflowRunStore(mlflow_run_id, uri)
            mirror.sync()
            found["mirror"] = mirror
        except Exception:  # no data there (a new run), or unreachable: nothing to adopt
            pass

    reader = threading.Thread(target=read, name="tb_microscope-mlflow-adopt", daemon=True)
    reader.start()
    if timeout is None:
        timeout = float(os.environ.get("TB_MICROSCOPE_MLFLOW_ADOPT_TIMEOUT", ADOPT_TIMEOUT_S))
    reader.join(timeout)
    mirror = found.get("mirror")
    index = mirror.local_index() if mirror is not None else None
    if index is None or MANIFEST not in index.files:
        return None
    adopt(store, mirror.root, index)
    return index.run_id


class ArtifactUploader(Uploader):
    """Uploads what the Logger's writer finishes in the staging `store` to an MLflow run, the
    index after the files it lists (see `store/upload.py` for the loop)."""

    thread_name = "tb_microscope-mlflow-upload"

    def __init__(
        self,
        store: RunStore,
        mlflow_run_id: str,
        uri: str,
        our_run_id: str,
    ):
        from mlflow import MlflowClient

        super().__init__(store, our_run_id)
        self.mlflow_run_id, self.uri = mlflow_run_id, uri
        self._client = MlflowClient(uri)
        self.resume_hint = (
            f"a Logger('mlflow', ..., run_id='{mlflow_run_id}') for the same model uploads them"
        )
        self.start()

    @property
    def where(self) -> str:
        return f"MLflow run {self.mlflow_run_id} at {self.uri}"

    def put(self, rel: str) -> None:
        folder = os.path.dirname(f"{ARTIFACTS}/{rel}")
        self._client.log_artifact(self.mlflow_run_id, str(self.store.root / rel), folder)

    def publish(self) -> None:
        """Upload the index: readers now see what it lists."""
        self.put(INDEX)

    def refusal(self) -> str | None:
        # another Logger's data there (one this Logger could not read when it started): never
        # replace its index
        theirs = self._client.get_run(self.mlflow_run_id).data.tags.get(TAG)
        if theirs is not None and theirs != self.index.run_id:
            return (
                f"{self.where} already holds the tb_microscope data of another Logger (run "
                f"{theirs}); nothing is uploaded there, so it stays as it was. This "
                f"training's snapshots are kept in {self.store.run_dir}; log into a new "
                "MLflow run (mlflow.start_run()), or, for the same model, start a Logger "
                "again while the server is reachable: it goes on with that run"
            )
        self._client.set_tag(self.mlflow_run_id, TAG, self.index.run_id)
        return None
