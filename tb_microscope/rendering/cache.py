"""Rendered images on disk, keyed by everything that changes them.

A cached image is a PNG whose text chunk holds its key and its objective and activation values.
It lives in `<run>/plugins/tb_microscope/cache/` when the run directory is writable, otherwise in
the user's cache directory (`$XDG_CACHE_HOME/tb_microscope/`, else `~/.cache/tb_microscope/`).
Writes are atomic, so an interrupted render never leaves a half-written image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..run import Run
from ..runstore import write_bytes_atomic
from .engine import ENGINE_VERSION

CACHE = "cache"


@dataclass(frozen=True)
class RenderKey:
    """Everything that changes a rendered image; `image` numbers a unit's diversity images."""

    step: int
    node: str
    unit: int
    technique: str
    size: int
    iterations: int
    seed: int
    image: int = 0

    def digest(self, run_id: str) -> str:
        fields = {"run": run_id, "engine": ENGINE_VERSION, **self.__dict__}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class CachedImage:
    image: np.ndarray  # uint8 H x W x 3
    objective: float
    activation: float


def _user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tb_microscope"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


class RenderCache:
    """The render cache of one run; `root` overrides where it lives."""

    def __init__(self, run: Run, root: str | os.PathLike | None = None):
        self.run_id = str(run.path.resolve())
        if root is not None:
            self.root = Path(root) / hashlib.sha256(self.run_id.encode()).hexdigest()[:16]
        else:
            self.root = run.store.root / CACHE
            if not _writable(self.root):
                digest = hashlib.sha256(self.run_id.encode()).hexdigest()[:16]
                self.root = _user_cache_root() / digest
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: RenderKey) -> Path:
        digest = key.digest(self.run_id)
        return self.root / f"step-{key.step}" / f"{digest}.png"

    def get(self, key: RenderKey) -> CachedImage | None:
        path = self.path(key)
        try:
            with Image.open(path) as png:
                meta = json.loads(png.text["tb_microscope"])
                image = np.asarray(png.convert("RGB"))
        except (OSError, KeyError, ValueError):
            return None  # missing, or unreadable: render again
        return CachedImage(image, meta["objective"], meta["activation"])

    def __contains__(self, key: RenderKey) -> bool:
        return self.path(key).is_file()

    def put(self, key: RenderKey, image: np.ndarray, objective: float, activation: float) -> Path:
        info = PngImagePlugin.PngInfo()
        meta = {
            "key": key.__dict__,
            "engine": ENGINE_VERSION,
            "objective": float(objective),
            "activation": float(activation),
        }
        info.add_text("tb_microscope", json.dumps(meta))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
        path = self.path(key)
        write_bytes_atomic(path, buffer.getvalue())
        return path


def render_cached(
    cache: RenderCache,
    run: Run,
    step: int,
    node: str,
    units: list[int],
    technique: str = "channel",
    *,
    size: int = 128,
    iterations: int = 512,
    seed: int = 0,
    device=None,
    batch_size: int | None = None,
    model=None,
    progress=None,
) -> dict[int, list[CachedImage]]:
    """Each unit's images, from the cache where present; the rest rendered in one go and stored.

    Since a unit's image does not depend on its batch-mates, rendering only the missing units
    gives the same pixels as rendering them all.
    """
    from .engine import render
    from .techniques import get_technique

    spec = get_technique(technique)
    per_unit = spec.images_per_unit
    if spec.whole_node:
        units = [0]

    def keys(unit: int) -> list[RenderKey]:
        return [
            RenderKey(step, node, unit, technique, size, iterations, seed, k)
            for k in range(per_unit)
        ]

    found = {u: [cache.get(k) for k in keys(u)] for u in dict.fromkeys(units)}
    missing = [u for u, images in found.items() if any(i is None for i in images)]
    if missing:
        result = render(
            run,
            step,
            node,
            missing,
            technique,
            size=size,
            iterations=iterations,
            seed=seed,
            device=device,
            batch_size=batch_size,
            model=model,
            progress=progress,
        )
        for i, unit in enumerate(result.units):
            k = i % per_unit
            cache.put(keys(unit)[k], result.images[i], result.objective[i], result.activation[i])
            found[unit][k] = CachedImage(
                result.images[i], float(result.objective[i]), float(result.activation[i])
            )
    return found
