"""Where a run's data lives, and finding runs, without importing torch: what the CLI needs to
answer "no runs there" at once."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RunNotFoundError

PLUGIN_NAME = "tb_microscope"
MANIFEST = "manifest.json"


def plugin_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "plugins" / PLUGIN_NAME


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
