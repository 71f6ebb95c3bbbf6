"""Writing an MLflow run: the Logger's uploader (`ArtifactUploader`), and what a Logger that goes
on with an MLflow run reads first (`adopt_remote`, `uploaded_steps`).

The Logger's writer writes into a local staging run directory as usual; a thread uploads each
finished file and then the index, and deletes a staged snapshot once the index that lists it is
uploaded. While the tracking server is unreachable the snapshots wait on disk (bounded by the
Logger's `backlog_mb`), retried with backoff; training never waits. What the uploader has to say
(an outage, a refusal) is a warning and a record of this module's logger (`errors.warn`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from ...errors import first_line, warn
from ..local import RunStore, write_bytes_atomic
from ..paths import MANIFEST
from .common import ARTIFACTS, TAG, file_sha256
from .index import INDEX, SMALL_FILES, Index, read_index, snapshot_rel
from .mirror import MlflowRunStore

RETRY_MAX_S = 30.0
ADOPT_TIMEOUT_S = 20.0  # how long a new Logger waits to read what its MLflow run holds
log = logging.getLogger(__name__)


def uploaded_steps(store: RunStore) -> list[int]:
    """The steps a staging store's uploader has uploaded (and deleted from the staging store)."""
    index = read_index(store.root / INDEX, str(store.root / INDEX))
    return sorted(index.snapshots) if index else []


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
    for name in sorted(index.files, key=SMALL_FILES.index):  # the manifest last: it makes a run
        (store.root / name).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(store.root / name, (mirror.root / name).read_bytes())
    write_bytes_atomic(store.root / INDEX, index.to_bytes())
    return index.run_id


class ArtifactUploader:
    """Uploads what the Logger's writer finishes in the staging `store` to an MLflow run."""

    def __init__(self, store: RunStore, mlflow_run_id: str, uri: str, our_run_id: str):
        from mlflow import MlflowClient

        self.store, self.mlflow_run_id, self.uri = store, mlflow_run_id, uri
        self._client = MlflowClient(uri)
        local = read_index(store.root / INDEX, str(store.root / INDEX))
        self.index = local if local is not None else Index(our_run_id)
        self._index_dirty = local is not None  # a resumed index may not have reached it
        self._tagged = False
        self._down_since: float | None = None
        self.error: str | None = None
        self.refused: str | None = None  # why nothing may be uploaded to this MLflow run
        self._wake = threading.Event()
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(
            target=self._loop, name="tb_microscope-mlflow-upload", daemon=True
        )
        self._thread.start()

    @property
    def where(self) -> str:
        return f"MLflow run {self.mlflow_run_id} at {self.uri}"

    def notify(self) -> None:
        """The writer finished a file: upload it."""
        self._wake.set()

    def backlog(self) -> tuple[int, int]:
        """(snapshots, bytes) staged and not uploaded yet."""
        count = size = 0
        for step in self.store.steps():
            with contextlib.suppress(OSError):
                size += self.store.snapshot_path(step).stat().st_size
                count += 1
        return count, size

    def _pending_small(self) -> list[str]:
        out = []
        for name in SMALL_FILES:
            path = self.store.root / name
            if not path.is_file():
                continue
            meta = self.index.files.get(name)
            if (
                meta is None
                or meta["size"] != path.stat().st_size
                or meta["sha256"] != file_sha256(path)
            ):
                out.append(name)
        return out

    def idle(self) -> bool:
        return not self._index_dirty and not self._pending_small() and not self.store.steps()

    def _upload(self, rel: str) -> None:
        folder = os.path.dirname(f"{ARTIFACTS}/{rel}")
        self._client.log_artifact(self.mlflow_run_id, str(self.store.root / rel), folder)

    def _publish(self) -> None:
        """Write the index locally, then upload it: readers now see what it lists."""
        write_bytes_atomic(self.store.root / INDEX, self.index.to_bytes())
        self._upload(INDEX)
        self._index_dirty = False

    def _round(self) -> None:
        if self.refused is not None:
            return
        if self.idle():  # nothing logged yet: the MLflow run is left as it is
            return
        if not self._tagged:
            # another Logger's data there (one this Logger could not read when it started):
            # never replace its index
            theirs = self._client.get_run(self.mlflow_run_id).data.tags.get(TAG)
            if theirs is not None and theirs != self.index.run_id:
                refused = (
                    f"{self.where} already holds the tb_microscope data of another Logger (run "
                    f"{theirs}); nothing is uploaded there, so it stays as it was. This "
                    f"training's snapshots are kept in {self.store.run_dir}; log into a new "
                    "MLflow run (mlflow.start_run()), or, for the same model, start a Logger "
                    "again while the server is reachable: it goes on with that run"
                )
                warn(refused, log=log)
                self.refused = refused
                return
            self._client.set_tag(self.mlflow_run_id, TAG, self.index.run_id)
            self._tagged = True
        for name in self._pending_small():
            path = self.store.root / name
            size, digest = path.stat().st_size, file_sha256(path)
            self._upload(name)
            self.index.files[name] = {"size": size, "sha256": digest}
            self._index_dirty = True
        if self._index_dirty:
            self._publish()
        for step in self.store.steps():
            path = self.store.snapshot_path(step)
            version = self.store.snapshot_version(step)
            size = path.stat().st_size
            self._upload(snapshot_rel(step))
            self.index.snapshots[step] = {"size": size, "version": version}
            self._index_dirty = True
            self._publish()
            path.unlink()  # uploaded and listed: the staged copy is no longer needed

    def _loop(self) -> None:
        delay = 1.0
        while True:
            self._wake.wait(timeout=delay if self._down_since is not None else None)
            self._wake.clear()
            try:
                self._round()
            except Exception as e:
                self.error = first_line(e)
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    count, size = self.backlog()
                    warn(
                        f"uploading to {self.where} failed ({self.error}); training goes on, "
                        f"and snapshots wait in {self.store.run_dir} ({count} now, "
                        f"{size / 1e6:.0f} MB) until the server is back",
                        e,
                        log,
                    )
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                if self._down_since is not None:
                    warn(
                        f"{self.where} is reachable again; the snapshots that waited are uploaded",
                        log=log,
                    )
                self._down_since, self.error, delay = None, None, 1.0
            with self._changed:
                self._changed.notify_all()
                if self._closing and (
                    self.idle() or self._down_since is not None or self.refused is not None
                ):
                    return

    def wait(self, timeout: float) -> bool:
        """Wait until everything staged is uploaded; False if `timeout` seconds passed first."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._changed:
            while not self.idle() and self.refused is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return self.idle()
                self._changed.wait(min(left, 1.0))
                self._wake.set()
        return True

    def close(self, timeout: float) -> None:
        """Upload what is staged (waiting up to `timeout` seconds), then stop; what could not be
        uploaded stays staged, and the next Logger on this MLflow run uploads it."""
        done = self.wait(timeout)
        if self.refused is not None:
            done = True  # said when it was refused
        with self._changed:
            self._closing = True
        self._wake.set()
        self._thread.join(timeout=5.0)
        if not done:
            count, size = self.backlog()
            warn(
                f"{count} snapshots ({size / 1e6:.0f} MB) could not be uploaded to {self.where}"
                f" ({self.error or 'still uploading'}); they are kept in {self.store.run_dir}, "
                f"and a Logger('mlflow', ..., run_id='{self.mlflow_run_id}') for the same model "
                "uploads them",
                log=log,
            )
