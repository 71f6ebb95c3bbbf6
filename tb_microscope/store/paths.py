"""Where a run's data lives: the plugin folder and its file names, the user cache, and finding
runs, without importing torch (what the CLI needs to answer "no runs there" at once)."""

from __future__ import annotations

import os
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


def find_runs(logdir: str | os.PathLike) -> list[Path]:
    """Every run directory under `logdir` (itself included) that holds tb_microscope data."""
    logdir = Path(logdir)
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
