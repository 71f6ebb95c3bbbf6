"""Runs in object storage, or anywhere an fsspec URL names (`s3://`, `gs://`, `memory://`, ...).

A run at a URL holds the same objects as a run directory (see `store/paths.py`): the event file
TensorBoard lists it by, and under `plugins/tb_microscope/` the manifest, the architecture, the
probe images and one object per snapshot. An object store puts each object whole (a reader sees
the old object or the new one, never half), so the objects themselves are the truth: no index is
kept there, and a run copied there from a local disk (`aws s3 sync`, `gsutil rsync`) reads as one
the Logger wrote.

Writing (`upload.RemoteUploader`, on the shared `store/upload.py` loop): the Logger writes into a
local staging run directory as usual; a thread puts each finished file with one put, the
architecture and probe images before the manifest that names them, each snapshot before the
event file that announces it. Access is checked once when the Logger starts (`common.check_access`).

Reading (`mirror.RemoteRunStore`, on the shared `store/mirror.py`): a `RunStore` over a mirror in
the user's cache; small files are fetched when they change, the snapshots' prefix is listed at most
every `LIST_EVERY_S` seconds, and a snapshot is fetched when first read, keyed by its object's
version (ETag and size), into a read-through cache bounded in bytes.

Finding runs under a URL (`listing.find_remote_runs`) imports no torch. Nothing here imports
fsspec until a URL is used.
"""

import importlib

_LAZY = {
    "RemoteRunStore": "mirror",
    "RemoteUploader": "upload",
    "adopt_remote": "upload",
    "find_remote_runs": "listing",
    "RemoteUnavailableError": "common",
    "check_access": "common",
    "mirror_dir": "common",
    "normalize": "common",
    "join": "common",
    "staging_dir": "common",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
