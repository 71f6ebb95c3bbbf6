"""Listing MLflow runs: those at a tracking server that hold tb_microscope data (`list_runs`), and
the list the tab shows next to the log directory's runs (`MlflowRuns`,
`--microscope_mlflow_tracking_uri`).

The list is asked of the tracking server at most every `LIST_EVERY_S` seconds, and each run's
mirror is synced (new snapshots, a replaced manifest) at most every `SYNC_EVERY_S` seconds, when
the tab asks for it. While the server is unreachable the runs already mirrored are shown from the
mirror; a run deleted in MLflow is listed with its error.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from ...errors import MicroscopeError, RunNotFoundError
from .common import TAG, MlflowUnavailableError, import_mlflow, mlflow_error
from .mirror import MlflowRunStore

LIST_EVERY_S = 10.0
SYNC_EVERY_S = 5.0
PREFIX = "mlflow:"

log = logging.getLogger("tb_microscope")


def _all_pages(search: Callable, what: str, uri: str) -> list:
    """Every item of a paged MLflow search, `search(page_token)` giving one page."""
    items, token = [], None
    while True:
        try:
            page = search(token)
        except Exception as e:
            raise mlflow_error(e, what, uri) from e
        items.extend(page)
        token = page.token
        if not token:
            return items


@dataclasses.dataclass(frozen=True)
class ListedRun:
    name: str  # "mlflow:<experiment>/<run name>", with the id's start when names repeat
    mlflow_run_id: str
    deleted: bool


def list_runs(uri: str, experiments: list[str] | None = None) -> list[ListedRun]:
    """The MLflow runs at `uri` that hold tb_microscope data (deleted ones too, marked), in the
    `experiments` named (by name or id; default all)."""
    import_mlflow()
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    found = _all_pages(
        lambda token: client.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        ),
        "the experiments",
        uri,
    )
    if experiments:
        wanted = set(experiments)
        found = [x for x in found if x.name in wanted or x.experiment_id in wanted]
    names = {x.experiment_id: x.name for x in found}
    runs = []
    ids = list(names)
    for start in range(0, len(ids), 100):  # the server takes at most 100 experiments at once
        runs += _all_pages(
            lambda token, some=ids[start : start + 100]: client.search_runs(
                some,
                filter_string=f"tags.`{TAG}` LIKE '%'",
                run_view_type=ViewType.ALL,
                max_results=1000,
                page_token=token,
            ),
            "the runs",
            uri,
        )
    labels = [f"mlflow:{names[r.info.experiment_id]}/{r.info.run_name}" for r in runs]
    out = []
    for run, label in zip(runs, labels):
        if labels.count(label) > 1:
            label = f"{label} ({run.info.run_id[:8]})"
        out.append(ListedRun(label, run.info.run_id, run.info.lifecycle_stage == "deleted"))
    return sorted(out, key=lambda r: r.name)


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
