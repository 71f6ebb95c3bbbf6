"""Runs kept in MLflow: the Logger's uploader, and the local mirror the reading side opens.

An MLflow run that holds tb_microscope data carries the tag `tb_microscope.run` (our run id) and,
under its artifacts' `tb_microscope/`, the same files as a run directory's plugin folder (see
`runstore.py`): manifest.json, model.pt2 or model.pkl, probe/images.safetensors and
snapshots/step-*.safetensors. Artifact stores have no atomic rename, so one more file,
`tb_microscope/index.json`, says what is complete: it is uploaded after the files it lists, and
readers use nothing else. Each listed file comes with its size and SHA-256 (snapshots with their
size and checksum), checked after download: a file caught half-uploaded or half-replaced is
not used, and is fetched again at the next sync.

Writing (`ArtifactUploader`): the Logger's writer writes into a local staging run directory as
usual; a thread uploads each finished file and then the index, and deletes a staged snapshot once
the index that lists it is uploaded. While the tracking server is unreachable the snapshots wait
on disk (bounded by the Logger's `backlog_mb`), retried with backoff; training never waits.

Reading (`MlflowRunStore`): a `RunStore` over a mirror in the user's cache. `sync()` fetches the
index and whatever small files changed; snapshots are fetched when first read, each once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import (
    IncompatibleRunError,
    MicroscopeError,
    RunNotFoundError,
    StepNotFoundError,
    first_line,
)
from .runstore import (
    EXPORTED_ARCHITECTURE,
    MANIFEST,
    PICKLED_ARCHITECTURE,
    PROBE,
    SNAPSHOTS,
    RunStore,
    header_version,
    read_header,
    user_cache_root,
    write_bytes_atomic,
)

ARTIFACTS = "tb_microscope"  # the folder of a run's artifacts our files go to
INDEX = "index.json"
INDEX_FORMAT = "tb_microscope.mlflow-index"
TAG = "tb_microscope.run"  # on an MLflow run that holds our data; its value is our run id
SMALL_FILES = (EXPORTED_ARCHITECTURE, PICKLED_ARCHITECTURE, PROBE, MANIFEST)  # manifest last
MLFLOW_URI = re.compile(r"^runs:/([A-Za-z0-9_-]{1,64})/?$")
MAX_INDEX_BYTES = 64 << 20
RETRY_MAX_S = 30.0
ADOPT_TIMEOUT_S = 20.0  # how long a new Logger waits to read what its MLflow run holds


class MlflowUnavailableError(MicroscopeError):
    """The tracking server (or its artifact store) could not be reached or refused a request."""


def parse_mlflow_uri(text: str) -> str:
    """The MLflow run id in `runs:/<run_id>`."""
    m = MLFLOW_URI.match(text)
    if not m:
        raise RunNotFoundError(
            f"{text!r} is not an MLflow run URI; write runs:/<run_id>, the id MLflow shows "
            "on the run's page"
        )
    return m.group(1)


def import_mlflow():
    """mlflow, or an error saying how to install it."""
    try:
        import mlflow
    except ImportError as e:
        raise MicroscopeError(
            "MLflow runs need the mlflow package: pip install 'tb-microscope[mlflow]'"
        ) from e
    # Its download progress bars would interleave with ours (and fill TensorBoard's log).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return mlflow


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI (what mlflow itself would use)."""
    return uri or import_mlflow().get_tracking_uri()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _place(uri: str) -> str:
    """A short name for a tracking server, for folders that must not mix two servers' runs."""
    return hashlib.sha256(uri.encode()).hexdigest()[:12]


def mirror_dir(uri: str, mlflow_run_id: str) -> Path:
    return user_cache_root() / "mlflow" / _place(uri) / mlflow_run_id


def staging_dir(uri: str, mlflow_run_id: str) -> Path:
    return user_cache_root() / "mlflow-upload" / _place(uri) / mlflow_run_id


def _snapshot_rel(step: int) -> str:
    return f"{SNAPSHOTS}/step-{step:09d}.safetensors"


# --- the index -------------------------------------------------------------------------------


@dataclasses.dataclass
class Index:
    """What an MLflow run's tb_microscope artifacts hold, complete: the small files (name ->
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


def _read_index(path: Path, source: str) -> Index | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return Index.parse(raw, source)


def uploaded_steps(store: RunStore) -> list[int]:
    """The steps a staging store's uploader has uploaded (and deleted from the staging store)."""
    index = _read_index(store.root / INDEX, str(store.root / INDEX))
    return sorted(index.snapshots) if index else []


# --- writing ---------------------------------------------------------------------------------


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
    index = mirror._local_index() if mirror is not None else None
    if index is None or MANIFEST not in index.files:
        return None
    for name in sorted(index.files, key=SMALL_FILES.index):  # the manifest last: it makes a run
        (store.root / name).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(store.root / name, (mirror.root / name).read_bytes())
    write_bytes_atomic(store.root / INDEX, index.to_bytes())
    return index.run_id


class ArtifactUploader:
    """Uploads what the Logger's writer finishes in the staging `store` to an MLflow run."""

    def __init__(
        self,
        store: RunStore,
        mlflow_run_id: str,
        uri: str,
        our_run_id: str,
        say: Callable[[str], None],
    ):
        from mlflow import MlflowClient

        self.store, self.mlflow_run_id, self.uri = store, mlflow_run_id, uri
        self._client = MlflowClient(uri)
        self._say = say
        local = _read_index(store.root / INDEX, str(store.root / INDEX))
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
                or meta["sha256"] != _sha256(path)
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
                self._say(refused)
                self.refused = refused
                return
            self._client.set_tag(self.mlflow_run_id, TAG, self.index.run_id)
            self._tagged = True
        for name in self._pending_small():
            path = self.store.root / name
            size, digest = path.stat().st_size, _sha256(path)
            self._upload(name)
            self.index.files[name] = {"size": size, "sha256": digest}
            self._index_dirty = True
        if self._index_dirty:
            self._publish()
        for step in self.store.steps():
            path = self.store.snapshot_path(step)
            version = self.store.snapshot_version(step)
            size = path.stat().st_size
            self._upload(_snapshot_rel(step))
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
                    self._say(
                        f"uploading to {self.where} failed ({self.error}); training goes on, "
                        f"and snapshots wait in {self.store.run_dir} ({count} now, "
                        f"{size / 1e6:.0f} MB) until the server is back"
                    )
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                if self._down_since is not None:
                    self._say(
                        f"{self.where} is reachable again; the snapshots that waited are uploaded"
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
            self._say(
                f"{count} snapshots ({size / 1e6:.0f} MB) could not be uploaded to {self.where}"
                f" ({self.error or 'still uploading'}); they are kept in {self.store.run_dir}, "
                f"and a Logger('mlflow', ..., run_id='{self.mlflow_run_id}') for the same model "
                "uploads them"
            )


def active_run_id(run_id: str | None) -> str:
    """`run_id`, else the active MLflow run's, else an error saying what to do."""
    if run_id:
        return run_id
    mlflow = import_mlflow()
    run = mlflow.active_run()
    if run is None:
        raise MicroscopeError(
            "Logger('mlflow', ...) logs into the active MLflow run, and there is none: call "
            "mlflow.start_run() first (or use `with mlflow.start_run():`), or pass run_id="
        )
    return run.info.run_id


# --- reading ---------------------------------------------------------------------------------


def _mlflow_error(e: Exception, what: str, uri: str) -> MicroscopeError:
    code = getattr(e, "error_code", "")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return RunNotFoundError(f"{what} does not exist at the MLflow tracking server {uri}")
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if code and code != "INTERNAL_ERROR" and "failed with exception" not in text:
        # the server answered, and refused
        return MlflowUnavailableError(f"the MLflow tracking server {uri} refused {what}: {text}")
    return MlflowUnavailableError(
        f"could not read {what} from the MLflow tracking server {uri} ({text}); check that the "
        "server is running and MLFLOW_TRACKING_URI (or the URI you gave) points at it"
    )


class MlflowRunStore(RunStore):
    """A run's tb_microscope artifacts in MLflow, read through a local mirror (see the module's
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
            raise _mlflow_error(e, f"{ARTIFACTS}/{rel} of {self.name}", self.uri) from e

    def sync(self) -> None:
        """Fetch the run's index and the small files that changed since the last sync."""
        from mlflow import MlflowClient

        try:
            info = MlflowClient(self.uri).get_run(self.mlflow_run_id).info
        except Exception as e:
            raise _mlflow_error(e, f"MLflow run {self.mlflow_run_id}", self.uri) from e
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
            local = self._local_index()
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

    def _local_index(self) -> Index | None:
        path = self.root / INDEX
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._index[0] != signature:
            self._index = (signature, _read_index(path, str(path)))
        return self._index[1]

    def has_manifest(self) -> bool:
        index = self._local_index()
        return index is not None and MANIFEST in index.files and super().has_manifest()

    def steps(self) -> list[int]:
        index = self._local_index()
        return sorted(index.snapshots) if index else []

    def snapshot_version(self, step: int) -> str:
        index = self._local_index()
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
                fetched = self._download(_snapshot_rel(step), folder)
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
        return path.stat().st_size == meta["size"] and _sha256(path) == meta["sha256"]
    except OSError:
        return False


def _snapshot_matches(path: Path, version: str) -> bool:
    try:
        header = read_header(path)
    except (OSError, ValueError):
        return False
    return header_version(header, "") == version


# --- listing ---------------------------------------------------------------------------------


def _all_pages(search: Callable, what: str, uri: str) -> list:
    """Every item of a paged MLflow search, `search(page_token)` giving one page."""
    items, token = [], None
    while True:
        try:
            page = search(token)
        except Exception as e:
            raise _mlflow_error(e, what, uri) from e
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
