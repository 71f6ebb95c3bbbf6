"""Reading a run kept elsewhere through a local mirror: `MirrorStore`, what the MLflow backend
(`mlflow/mirror.py`) and the object storage backend (`remote/mirror.py`) share.

A mirror is a `RunStore` over a folder in the user's cache. Its backend keeps the small files
(manifest, architecture, probe images) up to date and says which steps exist and each one's
version; a snapshot is fetched when first read, into a temporary folder, checked (`_check`), and
only then renamed into place, so a reader never uses half a snapshot. Fetched snapshots are a
read-through cache bounded in bytes (`SnapshotBudget`): the least recently used are deleted first
and fetched again if they are read again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

from .local import RunStore
from .paths import user_cache_root

DEFAULT_SNAPSHOT_CACHE_MB = 8192
_TOUCH_EVERY_S = 60.0


class SnapshotBudget:
    """Keeps the snapshots fetched under `root` (every mirror of one kind) under `max_bytes`,
    deleting the least recently used first (recency: each file's mtime, brought up to date when
    it is read). Default: TB_MICROSCOPE_SNAPSHOT_CACHE_MB, else 8 GiB."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        if max_bytes is None:
            mb = float(os.environ.get("TB_MICROSCOPE_SNAPSHOT_CACHE_MB", DEFAULT_SNAPSHOT_CACHE_MB))
            max_bytes = int(mb * (1 << 20))
        self.root, self.max_bytes = root, max_bytes
        self._lock = threading.Lock()

    def touch(self, path: Path) -> None:
        """`path` was read: it is the most recently used."""
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > _TOUCH_EVERY_S:
                os.utime(path)

    def admit(self, keep: Path) -> None:
        """A snapshot was fetched (`keep`): delete the least recently used others while the
        cache holds more than its bound."""
        with self._lock:
            files = []
            for path in self.root.glob("**/snapshots/*.safetensors"):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    files.append((st.st_mtime, st.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                if path != keep:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        total -= size


_budgets: dict[Path, SnapshotBudget] = {}
_budgets_lock = threading.Lock()


def snapshot_budget(kind: str) -> SnapshotBudget:
    """The one budget of the mirrors of `kind` ("mlflow", "remote") in this process."""
    root = user_cache_root() / kind
    with _budgets_lock:
        budget = _budgets.get(root)
        if budget is None:
            budget = _budgets[root] = SnapshotBudget(root)
        return budget


class MirrorStore(RunStore):
    """A `RunStore` over a local mirror (see the module's doc). A backend gives `name`, `steps`,
    `snapshot_version`, `_download(step, folder)` (the snapshot, downloaded into `folder`) and
    `_check(path, step)` (raises ValueError when what was downloaded is not that snapshot)."""

    def __init__(self, mirror: Path, budget: SnapshotBudget):
        super().__init__(mirror)
        self.budget = budget
        self._fetching = threading.Lock()

    @property
    def name(self) -> str:
        raise NotImplementedError

    @contextlib.contextmanager
    def temporary(self):
        """A folder of this thread's own in the mirror, removed afterwards."""
        folder = self.root / f".tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _download(self, step: int, folder: Path) -> Path:
        raise NotImplementedError

    def _check(self, path: Path, step: int) -> None:
        pass

    def _holds(self, path: Path, step: int) -> bool:
        """Whether the mirror's file at `path` is the current version of `step`'s snapshot."""
        return path.is_file()

    def fetch(self, step: int) -> Path:
        """The snapshot of `step` in the mirror, downloaded the first time (and after eviction)."""
        self.snapshot_version(step)  # a step that is not there: StepNotFoundError
        path = self.snapshot_path(step)  # (named by that version in some backends)
        with self._fetching:
            if self._holds(path, step):
                self.budget.touch(path)
                return path
            with self.temporary() as folder:
                fetched = self._download(step, folder)
                try:
                    self._check(fetched, step)
                except ValueError as e:
                    raise self._corrupt(step, path, f"as downloaded, {e}") from e
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(fetched, path)
        self.budget.admit(path)
        return path

    def snapshot_header(self, step: int, weights: dict | None = None):
        self.fetch(step)
        return super().snapshot_header(step, weights)

    def read_snapshot(self, step: int, device="cpu", weights: dict | None = None):
        self.fetch(step)
        return super().read_snapshot(step, device, weights)

    def missing_step_message(self, step: int) -> str:
        return super().missing_step_message(step).replace(f"run '{self.run_dir}'", self.name)
