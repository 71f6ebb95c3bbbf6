"""`tb-microscope render --log-to-mlflow`: the cached pictures logged into their MLflow run,
one image key per node and unit and one grid per node and step."""

from __future__ import annotations

import math
import re

import numpy as np

from ..errors import MicroscopeError


def _mlflow_key(*parts: str) -> str:
    """An MLflow image key from `parts`: characters MLflow refuses in keys become '_'."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", p) for p in parts)


def grid(images: list, gap: int = 2):
    """Images (uint8 H x W x 3, one size) tiled in a near-square grid on a white background."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    h, w = images[0].shape[:2]
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = image
    return out


def log_to_mlflow(jobs, technique, cache_dir, bands, *, size, iterations, seed) -> int:
    """Log the cached pictures of (run, step, node, units) `jobs` into their MLflow run: one
    image key per node and unit (MLflow's step slider walks it through training) and one grid
    per node and step. Returns how many images were logged."""
    from mlflow import MlflowClient

    from ..execution.cache import RenderCache, RenderKey

    logged = 0
    prefix = ("microscope",) if technique.name == "channel" else ("microscope", technique.name)
    for run, step, node, units in jobs:
        store = run.store
        client = MlflowClient(store.uri)
        cache = RenderCache(run, cache_dir)
        version = run.snapshot_version(step)
        pictures = []
        for unit in units:
            for image in range(technique.images_per_unit):
                key = RenderKey(
                    step, version, node, unit, technique.name, size, iterations, seed, image, bands
                )
                cached = cache.get(key)
                if cached is None:
                    raise MicroscopeError(
                        f"the picture of {node} unit {unit} at step {step} is not in the cache "
                        "(evicted meanwhile?); run the command again"
                    )
                what = "probe" if technique.compares else "unit"  # a caricature's are probe images
                suffix = f"{what}_{unit:04d}"
                suffix += f"_{image}" if technique.images_per_unit > 1 else ""
                name = "whole" if technique.whole_node else suffix
                key = _mlflow_key(*prefix, node, name)
                client.log_image(store.mlflow_run_id, cached.image, key=key, step=step)
                pictures.append(cached.image)
                logged += 1
        if len(pictures) > 1:
            client.log_image(
                store.mlflow_run_id,
                grid(pictures),
                key=_mlflow_key(*prefix, node, "grid"),
                step=step,
            )
            logged += 1
    return logged
