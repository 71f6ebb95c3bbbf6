"""The MLflow runs the tab lists next to the log directory's (`--microscope_mlflow_tracking_uri`).

The list is asked of the tracking server at most every `LIST_EVERY_S` seconds, and each run's
mirror is synced (new snapshots, a replaced manifest) at most every `SYNC_EVERY_S` seconds, when
the tab asks for it. While the server is unreachable the runs already mirrored are shown from the
mirror; a run deleted in MLflow is listed with its error.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import MicroscopeError, RunNotFoundError
from ..mlflow_store import ListedRun, MlflowRunStore, MlflowUnavailableError, list_runs

LIST_EVERY_S = 10.0
SYNC_EVERY_S = 5.0
PREFIX = "mlflow:"

log = logging.getLogger("tb_microscope")


class MlflowRuns:
    def __init__(self, uri: str, experiments: list[str] | None = None):
        self.uri, self.experiments = uri, experiments
        self._listed: dict[str, ListedRun] = {}
        self._listed_at: float | None = None
        self._stores: dict[str, MlflowRunStore] = {}
        self._syncing: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._unreachable = False

    def names(self) -> list[str]:
        """The listed runs' names, `mlflow:<experiment>/<run name>`."""
        with self._lock:
            stale = self._listed_at is None or time.monotonic() - self._listed_at > LIST_EVERY_S
            if stale:
                self._listed_at = time.monotonic()
                try:
                    self._listed = {r.name: r for r in list_runs(self.uri, self.experiments)}
                    self._unreachable = False
                except MicroscopeError as e:  # keep the last list; say it once per outage
                    if not self._unreachable:
                        log.warning("tb_microscope: listing MLflow runs failed: %s", e)
                    self._unreachable = True
            return sorted(self._listed)

    def store(self, name: str) -> MlflowRunStore | None:
        """The mirror of the listed run `name`, synced if it was not lately; None for a name
        that is not a listed MLflow run."""
        with self._lock:
            listed = self._listed.get(name) if name.startswith(PREFIX) else None
            if listed is None:
                return None
            if listed.deleted:
                raise RunNotFoundError(
                    f"MLflow run {listed.mlflow_run_id} ({name}) was deleted; restore it (mlflow "
                    f"runs restore --run-id {listed.mlflow_run_id}) to see it again"
                )
            key = listed.mlflow_run_id
            store = self._stores.get(key)
            if store is None:
                store = self._stores[key] = MlflowRunStore(key, self.uri)
                self._syncing[key] = threading.Lock()
            syncing = self._syncing[key]
        with syncing:  # one sync of a run at a time; the others wait for it
            if store.synced is None or time.monotonic() - store.synced > SYNC_EVERY_S:
                try:
                    store.sync()
                except MlflowUnavailableError as e:
                    if not store.has_manifest():
                        raise
                    store.synced = time.monotonic()  # try again later; show the mirror meanwhile
                    log.warning("tb_microscope: %s; showing %s as last fetched", e, name)
        return store
