"""Sweeps: render many units of many nodes at many steps of many runs, on one machine or a cluster.

One planner (`plan`) turns (runs x steps x nodes x units) and the render settings into
`Group`s, each one optimization (at most a batch of units of one node at one step), minus what the
cache already holds, ordered so that consecutive groups share a model (run, then step, then
node, in the order asked). Executors (`execution.py`: in this process, or on a Ray cluster)
render the groups, each with a `Renderer` (here, or in a Ray actor); results always come back to
the caller, which alone writes them into the cache (`store`): no file is written twice, and the
files are the same whichever executor rendered them.

Every render goes through the planner: the CLI's `render` and the demo
(`cli.render.render_jobs`), the plugin's render service (each queued request, on its worker's
executor) and `render_cached` (one node's units at one step, here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..lru import LRU
from ..optvis.batching import BATCH_CAPS, batch_size_for
from ..optvis.engine import RenderResult, render
from ..optvis.tap import frozen
from ..optvis.techniques import get_technique
from ..optvis.torch_state import restores_torch_state
from ..run import Run, open_run
from ..store.mirror import MirrorStore
from .cache import CachedImage, RenderCache, RenderKey, encode_png


@dataclass(frozen=True)
class Settings:
    """What every group of a sweep is rendered with."""

    technique: str = "channel"
    size: int = 128
    iterations: int = 512
    seed: int = 0
    bands: tuple[int, ...] | None = None
    batch_size: int | None = None  # images per optimization; None: what the device's memory fits

    def keys(self, step: int, version: str, node: str, unit: int) -> list[RenderKey]:
        per_unit = get_technique(self.technique).images_per_unit
        return [
            RenderKey(
                step,
                version,
                node,
                unit,
                self.technique,
                self.size,
                self.iterations,
                self.seed,
                image,
                self.bands,
            )  # fmt: skip
            for image in range(per_unit)
        ]


@dataclass(frozen=True)
class Group:
    """One optimization: `units` of `node` at `step` of the run a worker opens from `source`
    (its directory, or runs:/<id>); `run_id` and `version` name what the cache keys hold."""

    source: str
    run_id: str
    step: int
    version: str
    node: str
    units: tuple[int, ...]

    @property
    def model_key(self) -> tuple[str, int, str]:
        return (self.run_id, self.step, self.version)


@dataclass
class Rendered:
    """A group's images as they travel back: per unit and image index, the picture and its
    objective and activation; or, once `encoded` (on a Ray actor, so that the driver only
    writes files), each picture's PNG as the cache stores it."""

    units: list[int]
    images: np.ndarray | None  # N x H x W x 3 uint8, in the order of `units` (repeated per image)
    objective: np.ndarray
    activation: np.ndarray
    pngs: list[bytes] | None = None

    @classmethod
    def of(cls, result: RenderResult) -> Rendered:
        return cls(list(result.units), result.images, result.objective, result.activation)

    def encoded(self, group: Group, settings: Settings) -> Rendered:
        keys = picture_keys(group, settings, self.units)
        pngs = [
            encode_png(key, self.images[i], self.objective[i], self.activation[i])
            for i, key in enumerate(keys)
        ]
        return Rendered(self.units, None, self.objective, self.activation, pngs)


def picture_keys(group: Group, settings: Settings, units: Sequence[int]) -> list[RenderKey]:
    """The cache key of each picture of a group's result (`units` repeated per image)."""
    per_unit = get_technique(settings.technique).images_per_unit
    return [
        settings.keys(group.step, group.version, group.node, unit)[i % per_unit]
        for i, unit in enumerate(units)
    ]


def source_of(run: Run) -> str:
    """How another process opens `run`: its name for a run kept elsewhere (`runs:/<id>`, a URL),
    else its directory's absolute path."""
    return run.name if isinstance(run.store, MirrorStore) else str(run.path.resolve())


def group_size(technique: str, device_kind: str, batch_size: int | None) -> int:
    """Units per group: `batch_size` images (else the device kind's cap) over the technique's
    images per unit."""
    images = batch_size or BATCH_CAPS.get(device_kind, BATCH_CAPS["cpu"])
    return max(1, images // get_technique(technique).images_per_unit)


def plan(
    jobs: Sequence[tuple[Run, int, str, Sequence[int]]],
    settings: Settings,
    cache_dir: str | None,
    units_per_group: int,
    cache_of: Callable[[Run], RenderCache] | None = None,
) -> tuple[list[Group], int]:
    """The groups rendering (run, step, node, units) `jobs` takes, in the jobs' order, minus the
    units the cache holds already; and how many units those were. `cache_of` gives a run's
    cache when the caller keeps them open (else each run's under `cache_dir` is opened)."""
    groups, cached = [], 0
    caches: dict[str, RenderCache] = {}
    for run, step, node, units in jobs:
        cache = caches.get(run.id)
        if cache is None:
            cache = caches[run.id] = cache_of(run) if cache_of else RenderCache(run, cache_dir)
        version = run.snapshot_version(step)
        if get_technique(settings.technique).whole_node:
            units = [0]
        missing = [
            u
            for u in dict.fromkeys(units)
            if not all(k in cache for k in settings.keys(step, version, node, u))
        ]
        cached += len(units) - len(missing)
        for start in range(0, len(missing), units_per_group):
            chunk = tuple(missing[start : start + units_per_group])
            groups.append(Group(source_of(run), run.id, step, version, node, chunk))
    return groups, cached


def store(cache: RenderCache, group: Group, settings: Settings, rendered: Rendered) -> None:
    """Write a group's images into the cache (the caller's side, the only writer)."""
    for i, key in enumerate(picture_keys(group, settings, rendered.units)):
        if rendered.pngs is not None:
            cache.put_png(key, rendered.pngs[i])
        else:
            cache.put(key, rendered.images[i], rendered.objective[i], rendered.activation[i])


class Renderer:
    """What renders groups in one process (an in-process worker, or a Ray actor): the runs it
    opened and its last models, kept while consecutive groups share them."""

    def __init__(self, device: torch.device, allow_pickle: bool = False, models: int = 2):
        self.device, self.allow_pickle = device, allow_pickle
        self._runs: dict[str, Run] = {}
        self._models: LRU = LRU(max_items=models)

    @property
    def device_kind(self) -> str:
        return self.device.type

    def run(self, group: Group) -> Run:
        run = self._runs.get(group.source)
        if run is None or run.id != group.run_id:
            run = self._runs[group.source] = open_run(group.source, allow_pickle=self.allow_pickle)
        if run.id != group.run_id:
            raise RuntimeError(
                f"run {group.source} was logged again while the sweep ran (its id changed); "
                "run the command again"
            )
        return run

    def model(self, run: Run, group: Group) -> torch.nn.Module:
        return self._models.get_or_make(
            group.model_key, lambda: (frozen(run.load_model(group.step, self.device)), 0)
        )

    @restores_torch_state
    def render(
        self,
        group: Group,
        settings: Settings,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> Rendered:
        """The group's pictures; `progress` hears the fraction done now and then."""
        run = self.run(group)
        model = self.model(run, group)
        per_unit = get_technique(settings.technique).images_per_unit
        # one optimization for the group, unless the device's memory holds fewer images
        fits = settings.batch_size or batch_size_for(
            model, run, run.node(group.node), settings.size, self.device
        )
        result = render(
            run, group.step, group.node, list(group.units), settings.technique,
            size=settings.size, iterations=settings.iterations, seed=settings.seed,
            device=self.device, batch_size=min(len(group.units) * per_unit, fits), model=model,
            bands=settings.bands, should_stop=should_stop, progress=progress,
        )  # fmt: skip
        return Rendered.of(result)


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
    bands: tuple[int, ...] | None = None,
    progress=None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[int, list[CachedImage]]:
    """Each unit's images, from the cache where present; the rest rendered (the planner's one
    group of the missing units, stored batch by batch as each is done) and stored.

    Since a unit's image does not depend on its batch-mates, rendering only the missing units
    gives the same pixels as rendering them all.
    """
    settings = Settings(technique, size, iterations, seed, bands, batch_size)
    spec = get_technique(technique)
    if spec.whole_node:
        units = [0]
    version = run.snapshot_version(step)
    found = {
        u: [cache.get(k) for k in settings.keys(step, version, node, u)]
        for u in dict.fromkeys(units)
    }
    missing = [u for u, images in found.items() if any(i is None for i in images)]
    groups, _ = plan(
        [(run, step, node, missing)], settings, None, max(1, len(missing)), lambda r: cache
    )
    for group in groups:  # at most one: the missing units

        def stored(result: RenderResult, group=group) -> None:  # each batch as soon as it is done
            store(cache, group, settings, Rendered.of(result))
            for i, unit in enumerate(result.units):
                found[unit][i % spec.images_per_unit] = CachedImage(
                    result.images[i], float(result.objective[i]), float(result.activation[i])
                )

        render(
            run, step, node, list(group.units), technique, size=size, iterations=iterations,
            seed=seed, device=device, batch_size=batch_size, model=model, bands=bands,
            progress=progress, should_stop=should_stop, on_chunk=stored,
        )  # fmt: skip
    return found
