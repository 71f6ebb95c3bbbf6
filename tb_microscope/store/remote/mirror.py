"""Reading a run at a URL: `RemoteRunStore`, a `RunStore` over a mirror in the user's cache.

`sync()` lists the run's plugin prefix and its snapshots' prefix (two listings, and one look at
the probe images when there are some) and fetches the small files whose object changed, the
manifest last; it runs when the store is first used and then at most every `LIST_EVERY_S` seconds
as its steps or its manifest are asked for, so new steps appear without a request reading whole
folders. A snapshot is fetched when first read, checked (its size against the listing, its
safetensors header against its size) before it is renamed into the mirror under a name holding
its object's version; the mirror's snapshots are a read-through cache bounded in bytes (see
`store/mirror.py`). While the store does not answer, what is mirrored is shown (said once in the
log); a run never mirrored raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from ...errors import CorruptSnapshotError, MicroscopeError, RunNotFoundError, StepNotFoundError
from ..index import SMALL_FILES, snapshot_rel
from ..local import read_header, write_bytes_atomic
from ..mirror import MirrorStore, snapshot_budget
from ..paths import MANIFEST, PLUGIN_NAME, PROBE, SNAPSHOTS
from .common import (
    filesystem,
    join,
    mirror_dir,
    normalize,
    object_version,
    plugin_prefix,
    remote_error,
)

LIST_EVERY_S = 3.0
VERSIONS = "versions.json"  # the mirror's record: small file -> the version of its object
_SNAPSHOT_OBJECT = re.compile(r"^step-(\d{9,})\.safetensors$")

log = logging.getLogger("tb_microscope")


class RemoteRunStore(MirrorStore):
    """The run at `url`, read through a local mirror (see the module's doc)."""

    def __init__(self, url: str):
        self.url = normalize(url)
        self.fs, path = filesystem(self.url)
        self.prefix = plugin_prefix(path)
        super().__init__(mirror_dir(self.url), snapshot_budget("remote"))
        self._listed: dict[int, tuple[int, str]] = {}  # step -> (size, version)
        self._syncing = threading.Lock()
        self.synced: float | None = None  # time.monotonic() of the last sync that answered
        self.background = False  # sync on a thread of its own after the first (see refresh)
        self._tried: float | None = None
        self._outage: str | None = None

    @property
    def name(self) -> str:
        return self.url

    # --- syncing -------------------------------------------------------------------------------
    def _ls(self, prefix: str) -> dict[str, dict]:
        try:
            entries = self.fs.ls(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}

    def sync(self) -> None:
        """List the run's objects and fetch the small files that changed (the manifest last)."""
        with self._syncing:
            self._tried = time.monotonic()
            try:
                self._sync()
            except MicroscopeError:
                raise
            except Exception as e:
                raise remote_error(e, "read the run", self.url) from e
            self.synced = time.monotonic()
            if self._outage is not None:
                log.info("tb_microscope: %s answers again", self.url)
                self._outage = None

    def _sync(self) -> None:
        top = self._ls(self.prefix)
        if MANIFEST not in top:
            bucket = self.prefix.lstrip("/").split("/", 1)[0]
            if self.url.startswith(("s3://", "s3a://", "gs://", "gcs://")) and not self.fs.exists(
                bucket
            ):
                missing = FileNotFoundError(f"no bucket '{bucket}'")
                raise remote_error(missing, "read the run", self.url)
            raise RunNotFoundError(
                f"'{self.url}' holds no tb_microscope data (no plugins/tb_microscope/{MANIFEST} "
                "there). Pass the URL given to tb_microscope.Logger, or log a run first."
            )
        objects = {name: top[name] for name in SMALL_FILES if name in top}
        if "probe" in top:
            try:
                objects[PROBE] = self.fs.info(f"{self.prefix}/{PROBE}")
            except FileNotFoundError:
                pass
        listed = {}
        for name, info in self._ls(f"{self.prefix}/{SNAPSHOTS}").items():
            m = _SNAPSHOT_OBJECT.match(name)
            if m and info.get("type", "file") == "file":
                listed[int(m.group(1))] = (int(info["size"]), object_version(info))
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()  # a reader killed mid-download left them
        versions = self._versions_record()
        for name in SMALL_FILES:  # the manifest last: what it names is there before it
            info = objects.get(name)
            if info is None:
                continue
            version = object_version(info)
            if versions.get(name) == version and (self.root / name).is_file():
                continue
            with self.temporary() as folder:
                fetched = folder / name.replace("/", "_")
                self.fs.get_file(f"{self.prefix}/{name}", str(fetched))
                if fetched.stat().st_size != int(info["size"]):
                    continue  # replaced while it was fetched: at the next sync
                target = self.root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(fetched, target)
            versions[name] = version
            write_bytes_atomic(self.root / VERSIONS, json.dumps(versions).encode())
        self._listed = listed

    def _versions_record(self) -> dict:
        try:
            data = json.loads((self.root / VERSIONS).read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def refresh(self) -> None:
        """Sync if the last try is older than LIST_EVERY_S (at once the first time). While another
        thread syncs, or the store does not answer and something is mirrored, the mirror is
        used as it is. With `background` set (the TensorBoard plugin sets it), a sync after the
        first runs on a thread of its own, so that no request waits on the store."""
        if self._tried is not None and time.monotonic() - self._tried < LIST_EVERY_S:
            return
        if self.synced is not None and self._syncing.locked():
            return
        if self.background and self.synced is not None:
            self._tried = time.monotonic()  # one thread started per period
            threading.Thread(
                target=self._sync_or_keep, name="tb_microscope-remote-sync", daemon=True
            ).start()
            return
        self._sync_or_keep()

    def _sync_or_keep(self) -> None:
        try:
            self.sync()
        except MicroscopeError as e:
            if self.synced is None or (isinstance(e, RunNotFoundError) and not self.background):
                raise
            if self._outage is None:
                self._outage = str(e)
                log.warning("tb_microscope: %s; showing it as last read", e)

    # --- the RunStore --------------------------------------------------------------------------
    def has_manifest(self) -> bool:
        self.refresh()
        return super().has_manifest()

    def manifest_signature(self):
        self.refresh()
        return super().manifest_signature()

    def read_manifest(self):
        self.refresh()
        return super().read_manifest()

    def steps(self) -> list[int]:
        self.refresh()
        return sorted(self._listed)

    def snapshot_version(self, step: int) -> str:
        listed = self._listed.get(step)
        if listed is None:
            self.refresh()
            listed = self._listed.get(step)
            if listed is None:
                raise StepNotFoundError(self.missing_step_message(step))
        return listed[1]

    def snapshot_path(self, step: int) -> Path:
        listed = self._listed.get(step)
        tag = hashlib.sha256(listed[1].encode()).hexdigest()[:12] if listed else "unlisted"
        return self.root / SNAPSHOTS / f"step-{step:09d}-{tag}.safetensors"

    def present(self) -> list[str]:
        """The small files in the mirror, in SMALL_FILES' order."""
        return [name for name in SMALL_FILES if (self.root / name).is_file()]

    def listed(self, step: int) -> tuple[int, str]:
        """(size, version) of `step`'s snapshot object, as last listed."""
        return self._listed[step]

    def _download(self, step: int, folder: Path) -> Path:
        target = folder / f"step-{step:09d}.safetensors"
        try:
            self.fs.get_file(f"{self.prefix}/{SNAPSHOTS}/{target.name}", str(target))
        except Exception as e:
            raise remote_error(e, f"fetch the snapshot of step {step}", self.url) from e
        return target

    def _check(self, path: Path, step: int) -> None:
        size = self._listed[step][0]
        if path.stat().st_size != size:
            raise ValueError(f"{path.stat().st_size:,} bytes where {size:,} were listed")
        read_header(path)

    def _corrupt(self, step: int, path: Path, why: str) -> CorruptSnapshotError:
        """As a run directory says it, naming the object in the store rather than the mirror's
        file: the mirror is only a cache of the object, which is what to delete."""
        where = join(self.url, "plugins", PLUGIN_NAME, snapshot_rel(step))
        return CorruptSnapshotError(
            f"the snapshot of step {step} in run '{self.url}' is corrupt or truncated ({where}: "
            f"{why}). The other steps are unaffected; delete this object to drop the step, or log "
            "the step again."
        )
