"""Where runs live and their format: the manifest (`manifest.py`, the `Manifest` type), a run on a
local disk (`local.py`, `RunStore`: atomic writes, checked reads), the architecture file
(`architecture.py`: `model.pt2`, checked before it is loaded, and the pickle fallback), the
folder's names (`paths.py`), and runs in MLflow (`mlflow/`, `MlflowRunStore`).

Nothing here imports the code that trains, renders or serves. Its names load on first use, so
that `store.paths` (finding runs) imports no torch.
"""

import importlib

_LAZY = {
    "Manifest": "manifest",
    "InputSpec": "manifest",
    "FORMAT_VERSION": "manifest",
    "RunStore": "local",
    "atomic_write": "local",
    "write_bytes_atomic": "local",
    "find_runs": "paths",
    "plugin_dir": "paths",
    "user_cache_root": "paths",
    "MlflowRunStore": "mlflow",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
