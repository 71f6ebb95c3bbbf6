"""Uploading a run as the Logger writes it: `Uploader`, the loop that the MLflow backend
(`mlflow/upload.py`) and the object storage backend (`remote/upload.py`) share.

The Logger's writer writes into a local staging run directory as usual (atomic renames, as for a
run on a local disk); the uploader's thread uploads each finished file whole, the small files
(architecture, probe images) before the manifest that names them, then each snapshot, and after
each a `publish` that tells readers (MLflow: the index; object storage: the event file). A staged
snapshot is deleted once it is uploaded and published; the staging folder's `index.json` records
what was uploaded, so that a Logger started again goes on where this one stopped. While the
remote side is unreachable the snapshots wait on disk (bounded by the Logger's `backlog_mb`),
retried with backoff; training never waits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from ..errors import first_line, warn
from .index import INDEX, SMALL_FILES, Index, file_sha256, read_index, snapshot_rel
from .local import RunStore, write_bytes_atomic

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0


def uploaded_steps(store: RunStore) -> list[int]:
    """The steps a staging store's uploader has uploaded (and deleted from the staging store)."""
    index = read_index(store.root / INDEX, str(store.root / INDEX))
    return sorted(index.snapshots) if index else []


def adopt(store: RunStore, mirror: Path, index: Index) -> None:
    """Make the new staging `store` go on with a run read into the plugin folder `mirror`: copy
    the small files `index` lists (the manifest last: it makes a run), then the index, the record
    of what is uploaded already."""
    for name in sorted(index.files, key=SMALL_FILES.index):
        (store.root / name).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(store.root / name, (mirror / name).read_bytes())
    write_bytes_atomic(store.root / INDEX, index.to_bytes())


class Uploader:
    """Uploads what the Logger's writer finishes in the staging `store` (see the module's doc).

    A backend says where (`where`), how one file goes up (`put`, given its path relative to the
    plugin folder), what readers are told after each change (`publish`), and may refuse before
    the first upload (`refusal`)."""

    thread_name = "tb_microscope-upload"
    resume_hint = "a Logger on the same place for the same model uploads them"

    def __init__(self, store: RunStore, our_run_id: str):
        self.store = store
        local = read_index(store.root / INDEX, str(store.root / INDEX))
        self.index = local if local is not None else Index(our_run_id)
        self._index_dirty = local is not None  # a resumed index may not have reached it
        self._checked = False
        self._down_since: float | None = None
        self.error: str | None = None
        self.refused: str | None = None  # why nothing may be uploaded there
        self._wake = threading.Event()
        self._changed = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    # --- what a backend says -----------------------------------------------------------------
    @property
    def where(self) -> str:
        raise NotImplementedError

    def put(self, rel: str) -> None:
        """Upload `store.root / rel` whole."""
        raise NotImplementedError

    def publish(self) -> None:
        """Tell readers what the index (written locally just before) lists."""

    def stale(self) -> bool:
        """Whether readers need to be told more than the index says (the writer's event file
        grew since the last `publish`, say)."""
        return False

    def refusal(self) -> str | None:
        """Why nothing may be uploaded there (asked once, before the first upload), or None."""
        return None

    # --- the loop ------------------------------------------------------------------------------
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
        return (
            not self._index_dirty
            and not self._pending_small()
            and not self.store.steps()
            and not self.stale()
        )

    def _publish(self) -> None:
        write_bytes_atomic(self.store.root / INDEX, self.index.to_bytes())
        self.publish()
        self._index_dirty = False

    def _round(self) -> None:
        if self.refused is not None or self.idle():  # nothing logged yet: left as it is
            return
        if not self._checked:
            refused = self.refusal()
            if refused is not None:
                warn(refused, log=log)
                self.refused = refused
                return
            self._checked = True
        for name in self._pending_small():  # in SMALL_FILES' order: the manifest last
            path = self.store.root / name
            size, digest = path.stat().st_size, file_sha256(path)
            self.put(name)
            self.index.files[name] = {"size": size, "sha256": digest}
            self._index_dirty = True
        if self._index_dirty or self.stale():
            self._publish()
        for step in self.store.steps():
            path = self.store.snapshot_path(step)
            version = self.store.snapshot_version(step)
            size = path.stat().st_size
            self.put(snapshot_rel(step))
            self.index.snapshots[step] = {"size": size, "version": version}
            self._index_dirty = True
            self._publish()
            path.unlink()  # uploaded and published: the staged copy is no longer needed

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
                        f"{size / 1e6:.0f} MB) until it is reachable again",
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
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return self.idle()
                self._changed.wait(min(left, 1.0))
                self._wake.set()
        return True

    def close(self, timeout: float) -> None:
        """Upload what is staged (waiting up to `timeout` seconds), then stop; what could not be
        uploaded stays staged, and the next Logger on the same place uploads it."""
        done = self.wait(timeout)
        if self.refused is not None:
            done = True  # said when it was refused
        with self._changed:
            self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if not done:
            count, size = self.backlog()
            warn(
                f"{count} snapshots ({size / 1e6:.0f} MB) could not be uploaded to {self.where}"
                f" ({self.error or 'still uploading'}); they are kept in {self.store.run_dir}, "
                f"and {self.resume_hint}"
            )
