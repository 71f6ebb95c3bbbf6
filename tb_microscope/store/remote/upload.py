"""Writing a run at a URL: `RemoteUploader` (the shared `store/upload.py` loop putting each
finished file with one put), and `adopt_remote`, what a Logger that goes on with a run there reads
first."""

from __future__ import annotations

import re
import threading

from ...errors import MicroscopeError
from ..index import INDEX, Index, file_sha256
from ..local import RunStore
from ..paths import SNAPSHOTS
from ..upload import Uploader, adopt
from .common import filesystem, normalize, plugin_prefix, remote_error
from .mirror import RemoteRunStore

ADOPT_TIMEOUT_S = 20.0
_EVENT_FILE = re.compile(r"^events\.out\.tfevents\..*\.tb_microscope$")


class RemoteUploader(Uploader):
    """Puts what the Logger's writer finishes in the staging `store` at `url`: each file whole,
    the manifest after the files it names, and after each snapshot the event file that makes
    TensorBoard list the step."""

    thread_name = "tb_microscope-remote-upload"

    def __init__(self, store: RunStore, url: str, our_run_id: str):
        super().__init__(store, our_run_id)
        self.url = normalize(url)
        self.fs, self.path = filesystem(self.url)
        self.prefix = plugin_prefix(self.path)
        self.resume_hint = f"a Logger on {self.url} for the same model uploads them"
        self._events: dict[str, int] = {}  # event file -> bytes put
        self.start()

    @property
    def where(self) -> str:
        return self.url

    def put(self, rel: str) -> None:
        try:
            self.fs.put_file(str(self.store.root / rel), f"{self.prefix}/{rel}")
        except Exception as e:
            raise remote_error(e, f"put {rel}", self.url) from e

    def _event_files(self) -> dict[str, int]:
        sizes = {}
        if not self.store.run_dir.is_dir():  # nothing written yet
            return sizes
        for path in self.store.run_dir.iterdir():
            if _EVENT_FILE.match(path.name):
                sizes[path.name] = path.stat().st_size
        return sizes

    def stale(self) -> bool:
        return any(self._events.get(n) != s for n, s in self._event_files().items())

    def publish(self) -> None:
        """Put the event files that grew: TensorBoard lists the run's steps from them."""
        for name, size in self._event_files().items():
            if self._events.get(name) != size:
                try:
                    self.fs.put_file(str(self.store.run_dir / name), f"{self.path}/{name}")
                except Exception as e:
                    raise remote_error(e, f"put {name}", self.url) from e
                self._events[name] = size


def adopt_remote(store: RunStore, url: str, timeout: float = ADOPT_TIMEOUT_S) -> str | None:
    """When the staging `store` is new and `url` already holds a run (logged from another
    machine, or before this machine's cache was cleared), copy its small files into the staging
    store and record its snapshots as uploaded, so that the Logger goes on with that run (its run
    id, its steps; a different model refused) rather than replacing it. Returns the run id
    adopted, or None."""
    if store.has_manifest() or (store.root / INDEX).exists():
        return None
    found: dict = {}

    def read() -> None:
        try:
            mirror = RemoteRunStore(url)
            mirror.sync()
            found["mirror"] = mirror
            found["manifest"] = mirror.read_manifest()
        except MicroscopeError as e:  # no run there (a new run), or unreachable
            found["error"] = e

    reader = threading.Thread(target=read, name="tb_microscope-remote-adopt", daemon=True)
    reader.start()
    reader.join(timeout)
    mirror = found.get("mirror")
    if mirror is None or "manifest" not in found:
        return None
    index = Index(found["manifest"].run_id)
    for name in mirror.present():
        path = mirror.root / name
        index.files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    for step in mirror.steps():
        size, version = mirror.listed(step)
        index.snapshots[step] = {"size": size, "version": version}
    adopt(store, mirror.root, index)
    (store.root / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
    return index.run_id
