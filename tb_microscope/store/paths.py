"""Where a run's data lives: the plugin folder and its file names, the user cache, and finding
runs, without importing torch (what the CLI needs to answer "no runs there" at once)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import RunNotFoundError

PLUGIN_NAME = "tb_microscope"
MANIFEST = "manifest.json"
EXPORTED_ARCHITECTURE = "model.pt2"
PICKLED_ARCHITECTURE = "model.pkl"
SNAPSHOTS = "snapshots"
PROBE = "probe/images.safetensors"


def plugin_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "plugins" / PLUGIN_NAME


def user_cache_root() -> Path:
    """Where tb_microscope keeps what it derives: `$XDG_CACHE_HOME/tb_microscope`, else
    `~/.cache/tb_microscope`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tb_microscope"


def is_mlflow_uri(text) -> bool:
    return isinstance(text, str) and text.startswith("runs:/")


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def remote_protocol(text) -> str | None:
    """The protocol of an fsspec URL (`s3`, `gs`, `memory`, ...); None for a local path, a
    `file://` URL or `runs:/` (MLflow)."""
    m = _URL.match(text) if isinstance(text, str) else None
    if m is None or m.group(1).lower() in ("file", "local"):
        return None
    return m.group(1).lower()


def is_remote_url(text) -> bool:
    return remote_protocol(text) is not None


def local_path(text: str | os.PathLike) -> Path:
    """A local path, `file://` URLs included."""
    if isinstance(text, str) and re.match(r"^(file|local)://", text):
        text = text.split("://", 1)[1]
    return Path(text)


def relative_run(run, logdir) -> str:
    """`run` (a Path or URL that `find_runs(logdir)` found) relative to `logdir`; '.' for itself."""
    if is_remote_url(str(logdir)):
        rel = str(run)[len(str(logdir).rstrip("/")) :].strip("/")
        return rel or "."
    return str(Path(run).relative_to(local_path(logdir)))


def run_basename(run) -> str:
    return str(run).rstrip("/").rsplit("/", 1)[-1]


def find_runs(logdir: str | os.PathLike) -> list:
    """Every run under `logdir` (itself included) that holds tb_microscope data: run directories
    (Paths), or for an fsspec URL, the runs' URLs (strings)."""
    if is_remote_url(logdir):
        from .remote.listing import find_remote_runs

        return find_remote_runs(logdir)
    logdir = local_path(logdir)
    if not logdir.is_dir():
        raise RunNotFoundError(f"'{logdir}' is not a directory")
    found = []
    for root, dirs, files in os.walk(logdir):
        here = Path(root)
        if here.name == PLUGIN_NAME and here.parent.name == "plugins":
            if MANIFEST in files:
                found.append(here.parent.parent)
            dirs.clear()
        dirs.sort()
    return sorted(found)
