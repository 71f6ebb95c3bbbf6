"""Finding the runs under a URL: one recursive listing, no torch."""

from __future__ import annotations

from ..paths import MANIFEST, PLUGIN_NAME
from .common import filesystem, join, normalize, remote_error


def find_remote_runs(url: str) -> list[str]:
    """The URLs of every run under `url` (itself included) that holds tb_microscope data."""
    url = normalize(url)
    fs, path = filesystem(url)
    marker = f"/plugins/{PLUGIN_NAME}/{MANIFEST}"
    try:
        found = fs.find(path) if path else fs.find("")
    except FileNotFoundError:
        return []
    except Exception as e:
        raise remote_error(e, "list the runs", url) from e
    runs = []
    for name in found:
        name = name.lstrip("/")
        if name.endswith(marker):
            rel = name[: -len(marker)][len(path.lstrip("/")) :].strip("/")
            if "/plugins/" not in f"/{rel}/":  # not a run's own plugin folder's contents
                runs.append(join(url, rel))
    return sorted(runs)
