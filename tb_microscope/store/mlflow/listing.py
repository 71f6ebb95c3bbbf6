"""Listing MLflow runs: those at a tracking server that hold tb_microscope data (`list_runs`), and
the list the tab shows next to the log directory's runs (`MlflowRuns`,
`--microscope_mlflow_tracking_uri`).

The tab's list is asked of the tracking server by a thread of its own, every `LIST_EVERY_S`
seconds while the tab is used; a request reads the last list and never waits on it. A shown run's
mirror is synced (new snapshots, a replaced manifest) at most every `SYNC_EVERY_S` seconds, when
the tab asks for it. While the server does not answer, the runs already mirrored are shown from
the mirror without asking it; a run deleted in MLflow is listed with its error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable

from ...errors import MicroscopeError, RunNotFoundError
from .common import (
    TAG,
    MlflowUnavailableError,
    MlflowUnreachableError,
    import_mlflow,
    mlflow_error,
)
from .mirror import MlflowRunStore

LIST_EVERY_S = 10.0
SYNC_EVERY_S = 5.0
IDLE_AFTER_S = 120.0  # the list is not asked for while the tab has not been used for this long
# MLflow's own defaults (a 120 s timeout, then 7 retries with backoff) would hold a sync for
# minutes. A request that fails is not retried: the list is asked for again in LIST_EVERY_S, and
# each retry would be one more log line (urllib3's) per listing through an outage.
REQUEST_TIMEOUT_S = 5
REQUEST_RETRIES = 0
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


def bound_requests() -> None:
    """Bound MLflow's HTTP requests in this process (a timeout, no retry), where the user has not
    set MLFLOW_HTTP_REQUEST_TIMEOUT or MLFLOW_HTTP_REQUEST_MAX_RETRIES. mlflow reads both from the
    environment at each request, and `MlflowClient` and the artifact repositories take no bound
    of their own, so the environment of this process is the only place to put it."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(REQUEST_RETRIES))


class MlflowRuns:
    """The tab's MLflow runs: the last list a background thread got (`names`), and each listed
    run's mirror (`store`). Made by the TensorBoard plugin, and so it bounds MLflow's requests in
    TensorBoard's process (`bound_requests`).

    `_lock` guards the list, the outage and the stores, and is never held across a network call;
    a run's sync holds that run's own lock, which no local run's route takes."""

    def __init__(self, uri: str, experiments: list[str] | None = None):
        bound_requests()
        self.uri, self.experiments = uri, experiments
        self._listed: dict[str, ListedRun] = {}
        self._stores: dict[str, MlflowRunStore] = {}
        self._syncing: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._lister: threading.Thread | None = None
        self._used_at = time.monotonic()
        self._tried_at: float | None = None  # when the last listing answered or failed
        self._outage: str | None = None  # why the server is taken as down, while it is
        self._closed = False

    def names(self) -> list[str]:
        """The listed runs' names, `mlflow:<experiment>/<run name>`, as last listed (none before
        the first listing answers)."""
        with self._lock:
            self._use()
            return sorted(self._listed)

    def pending(self) -> bool:
        """Whether the first listing is still under way (the list may not be empty then)."""
        with self._lock:
            self._use()
            return self._tried_at is None

    def close(self) -> None:
        """Stop listing (a listing under way ends by itself, within the request timeout)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def _use(self) -> None:
        """The tab is used: list again if it is time (under `_lock`). The lister starts at the
        first use, and one that died is replaced."""
        self._used_at = time.monotonic()
        if self._closed:
            return
        if self._lister is None or not self._lister.is_alive():
            self._lister = threading.Thread(
                target=self._list_while_used, name="tb_microscope-mlflow-list", daemon=True
            )
            self._lister.start()
        self._wake.notify()  # one idle since the tab was last used lists again at once

    def _wait_s(self) -> float | None:
        """How long the lister waits before listing again; 0: now; None: until the tab is used
        (under `_lock`)."""
        now = time.monotonic()
        if now - self._used_at > IDLE_AFTER_S:
            return None
        if self._tried_at is None:
            return 0.0
        return max(0.0, self._tried_at + LIST_EVERY_S - now)

    def _list_while_used(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (wait := self._wait_s()) != 0.0:
                    self._wake.wait(wait)
                if self._closed:
                    return
            self._list()

    def _list(self) -> None:
        """Ask the server for the list; keep the last one if it does not answer."""
        try:
            listed = list_runs(self.uri, self.experiments)
        except MicroscopeError as e:
            self._failed(str(e))
        except Exception as e:  # not one of ours: a bug, or an MLflow error we do not expect
            self._failed(f"listing MLflow runs at {self.uri} failed: {e!r}", exc_info=True)
        else:
            with self._lock:
                self._listed = {r.name: r for r in listed}
                was, self._outage = self._outage, None
            if was is not None:
                log.info("tb_microscope: the MLflow tracking server %s answers again", self.uri)
        with self._lock:
            self._tried_at = time.monotonic()

    def _failed(self, why: str, exc_info: bool = False) -> None:
        """The server did not answer (a listing, or a sync): say so once per outage; syncs wait
        for the next listing that answers."""
        with self._lock:
            first, self._outage = self._outage is None, self._outage or why
        if first:
            log.warning(
                "tb_microscope: %s; MLflow runs are shown as last fetched until it answers (asked "
                "again every %g s)",
                why,
                LIST_EVERY_S,
                exc_info=exc_info,
            )

    def store(self, name: str) -> MlflowRunStore | None:
        """The mirror of the listed run `name`, synced if it was not lately (and the server
        answers); None for a name that is not a listed MLflow run."""
        if not name.startswith(PREFIX):
            return None
        with self._lock:
            self._use()
            listed = self._listed.get(name)
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
            with self._lock:
                outage = self._outage
            if outage is not None:  # shown as last fetched, without asking
                if not store.has_manifest():
                    raise MlflowUnreachableError(f"{outage}; {name} is shown once it answers")
            elif store.synced is None or time.monotonic() - store.synced > SYNC_EVERY_S:
                try:
                    store.sync()
                except MlflowUnreachableError as e:
                    self._failed(str(e))
                    if not store.has_manifest():
                        raise
                except MlflowUnavailableError as e:  # it answered, and refused
                    if not store.has_manifest():
                        raise
                    store.synced = time.monotonic()  # try again later; show the mirror meanwhile
                    log.warning("tb_microscope: %s; showing %s as last fetched", e, name)
        return store
