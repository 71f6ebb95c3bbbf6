"""Activation atlases (Carter et al., 2019), over training.

An atlas shows the space a node's units span together. Activations of the node on the run's
probe images, at random positions (a map's positions, a token node's patch tokens; one per image
for a vector node), are laid out in 2-D (`embedding.py`: UMAP, else PCA); a grid over the layout
averages the activations of each cell, and each cell's average direction is rendered as a
feature visualization.

Over training, the layout is fitted once, on the activations at `layout_step` (by default the
last logged step), and kept for every step: the same probe positions fall in the same cells at
every step, so a cell's picture at step t shows what the model at step t makes of the same
patches. Atlases of two steps differ in their directions, examples' order and pictures, never
in `coords`, `sources`, or which cells there are.

As in lucid's activation atlas (its notebooks and `lucid.recipes.activation_atlas`):
- the layout is made of the raw activations (UMAP's cosine metric);
- cells holding fewer than `min_count` activations are left empty (lucid's notebooks drop
  cells of at most 10 of 100,000 activations; the default 3 suits a few thousand);
- a cell's picture maximizes its direction at the centre position of the node's map (the centre
  patch token; a vector node's vector): dot x cosine (lucid's `direction_neuron_cossim`,
  cosine to the first power, floored at 0.1 as the caricature's so that the objective keeps
  rising with the dot product where the cosine is small or negative), against the direction
  *whitened* by the activations' inverse correlation matrix (lucid's `S`): what sets the cell
  apart counts more than what every activation shares. The whitening is computed at the step
  rendered, from that step's sampled activations, with a ridge of WHITENING_RIDGE x their mean
  square (lucid inverts the plain matrix, which is singular where a unit never fires).
  `Cell.direction` is the plain mean.

All cells are rendered by the engine (`engine.optimize`), in batches as `render` makes them;
cell (row, col)'s starting noise and transforms come from a generator seeded by (seed, node,
row x grid + col), so the same cell starts from the same noise at every step and its picture
does not depend on its batch-mates. An atlas is cached with the run's renders, keyed by the run
id, the snapshot versions of `step` and `layout_step`, the node and every setting; the layout
alone too, so a filmstrip of steps fits it once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MicroscopeError
from ..execution.cache import RenderCache, ResultKey
from ..limits import SettingError, check_grid, check_iterations, check_size
from ..nodes import Node, NodeActivations
from ..optvis.batching import batch_size_for
from ..optvis.engine import (
    Quality,
    RenderCancelled,
    RenderResult,
    default_device,
    in_batches,
    optimize,
)
from ..optvis.numerics import usable_numerics
from ..optvis.param import InputSpace, canvas_for
from ..optvis.tap import NodeTap, frozen
from ..optvis.techniques import CARICATURE_FLOOR, Objective, Technique, dot_and_cosine
from ..optvis.torch_state import restores_torch_state
from ..run import Run
from .embedding import embed, resolve_method

QUALITIES = {"full": Quality(64, 128), "preview": Quality(32, 24)}
MAX_SAMPLES = 4096  # activations sampled over the probe images, at most
MIN_COUNT = 3  # activations a cell needs to be drawn
PROBE_BATCH = 32  # probe images per forward pass while sampling
DIRECTION_POWER = 1  # lucid's atlas: dot x cosine ** 1
WHITENING_RIDGE = 0.01  # of the activations' mean square, added to the correlation's diagonal
NEAREST_UNITS = 3  # units named per cell as the nearest to its direction
EMPTY = 255  # an empty cell's grey level (white)
ATLAS = "atlas"
# 1: the first form; 2: cells name their nearest units. Changes to sampling, layout, rendering
# or what an atlas holds bump it
ATLAS_VERSION = 2


@dataclass
class Cell:
    """A non-empty cell of an atlas's grid: where it is, how many sampled activations fall in
    it, their mean (one value per unit, at the atlas's step), its picture (uint8 H x W x 3),
    the probe images of its activations, most typical first (the nearest to the mean; each
    image once), and the units nearest its direction (`nearest_units`), nearest first."""

    row: int
    col: int
    count: int
    direction: np.ndarray
    image: np.ndarray
    examples: list[int]
    units: list[int]


@dataclass
class Atlas:
    """An activation atlas of `node` at `step`, laid out at `layout_step`.

    `image` (uint8, grid x size pixels a side, x 3) holds the cells' pictures at their places,
    empty cells white; `cells` the non-empty cells, by row then column; `coords` (float32
    M x 2, in [0, 1]: x, then y downwards) each sampled activation's place in the layout;
    `sources` (int M x 3) the (probe image, row, col) it was taken at, row and col -1 for a
    vector node. `layout_method` says how it was laid out ("umap" or "pca")."""

    image: np.ndarray
    cells: list[Cell]
    coords: np.ndarray
    sources: np.ndarray
    step: int
    node: str
    grid: int
    layout_step: int
    layout_method: str
    size: int
    iterations: int

    def rgba(self) -> np.ndarray:
        """`image` with an alpha channel: the cells opaque, the empty ones transparent (for a
        page of any background)."""
        alpha = np.zeros(self.image.shape[:2], np.uint8)
        for cell in self.cells:
            top, left = cell.row * self.size, cell.col * self.size
            alpha[top : top + self.size, left : left + self.size] = 255
        return np.dstack([self.image, alpha])

    def sample_cells(self) -> np.ndarray:
        """Per sampled activation, the (row, col) of its grid cell: int M x 2."""
        return cell_indexes(self.coords, self.grid)

    def to_dict(self) -> dict:
        """What it is and where everything lies, as JSON can hold it (no pictures, no
        directions): the settings, each cell's row, col, count, examples and nearest units,
        each sample's place (4 decimals) and source."""
        return {
            "step": self.step,
            "node": self.node,
            "grid": self.grid,
            "layout_step": self.layout_step,
            "layout_method": self.layout_method,
            "size": self.size,
            "iterations": self.iterations,
            "cells": [
                {
                    "row": c.row,
                    "col": c.col,
                    "count": c.count,
                    "examples": c.examples,
                    "units": c.units,
                }
                for c in self.cells
            ],
            "coords": np.round(self.coords.astype(np.float64), 4).tolist(),
            "sources": self.sources.tolist(),
        }


def cell_indexes(coords: np.ndarray, grid: int) -> np.ndarray:
    """Per place in [0, 1]^2, its cell's (row, col) in a grid x grid grid (row from y)."""
    cells = np.floor(np.asarray(coords, dtype=np.float64) * grid).astype(np.int64)
    return np.clip(cells, 0, grid - 1)[:, ::-1]


def nearest_units(
    directions: np.ndarray, activations: np.ndarray, count: int = NEAREST_UNITS
) -> np.ndarray:
    """Per direction (K x units, the cells' means), the `count` units nearest it, nearest first:
    the units along which it lies furthest above the mean of all the sampled `activations`
    (the largest components of the direction less that mean, so of its cosine with each unit's
    axis from there). Measured from the mean, not from zero, so that the units that fire
    strongly everywhere are not named for every cell; not in standard deviations, which would
    name units that barely vary, whose pictures are faint."""
    offsets = directions - activations.mean(0)
    return np.argsort(-offsets, axis=1, kind="stable")[:, : min(count, directions.shape[1])]


def sample_sources(
    images: int, grid: tuple[int, int] | None, seed: int, samples: int = MAX_SAMPLES
) -> np.ndarray:
    """(probe image, row, col) of each activation to sample, M x 3: up to `samples`, spread
    evenly over the images (as many positions of each as fit, none twice), positions drawn by a
    generator seeded by `seed` alone. `grid` is the node's (rows, cols) of positions, None for a
    vector node (one activation per image; row and col -1)."""
    rng = np.random.default_rng([seed, 0xA71A5])
    positions = 1 if grid is None else grid[0] * grid[1]
    chosen = np.arange(images)
    if images > samples:
        chosen = np.sort(rng.choice(images, samples, replace=False))
    per_image = max(1, min(positions, samples // len(chosen)))
    if grid is None:
        return np.stack([chosen, -np.ones_like(chosen), -np.ones_like(chosen)], 1)
    picked = np.stack([np.sort(rng.choice(positions, per_image, replace=False)) for _ in chosen])
    rows, cols = np.divmod(picked, grid[1])
    return np.stack([np.repeat(chosen, per_image), rows.ravel(), cols.ravel()], 1)


def check_stop(should_stop: Callable[[], bool] | None, what: str = "the computation") -> None:
    """`RenderCancelled` (saying `what` was cancelled) once `should_stop` returns True."""
    if should_stop is not None and should_stop():
        raise RenderCancelled(f"{what} was cancelled: nobody is waiting for it")


def sampled_activations(
    run: Run,
    model: nn.Module,
    node: Node,
    images: torch.Tensor,
    seed: int,
    device: torch.device,
    samples: int = MAX_SAMPLES,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The node's activations (float32 M x units) at the positions `sample_sources` draws, and
    those sources (M x 3), from forward passes of PROBE_BATCH probe images at a time: only the
    sampled vectors are kept."""
    space, tap = InputSpace(run.input_spec, device), NodeTap(model, node)
    sources, parts = None, []
    with torch.no_grad():
        for start in range(0, len(images), PROBE_BATCH):
            check_stop(should_stop)
            end = min(start + PROBE_BATCH, len(images))
            if sources is not None and not np.any((sources[:, 0] >= start) & (sources[:, 0] < end)):
                continue  # no activation sampled from these images
            maps = tap(space(images[start:end].to(device).float() / 255)).maps.float()
            if sources is None:
                grid = tuple(maps.shape[2:]) if maps.dim() == 4 else None
                sources = sample_sources(len(images), grid, seed, samples)
            here = sources[(sources[:, 0] >= start) & (sources[:, 0] < end)]
            index = torch.from_numpy(here[:, 0] - start).to(maps.device)
            if maps.dim() == 4:
                rows = torch.from_numpy(here[:, 1]).to(maps.device)
                cols = torch.from_numpy(here[:, 2]).to(maps.device)
                parts.append(maps[index, :, rows, cols].cpu())
            else:
                parts.append(maps[index].cpu())
    return torch.cat(parts).numpy(), sources


def whitened(directions: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """`directions` (K x units) times lucid's whitening matrix S: the inverse of the M
    activations' (uncentred) correlation matrix, with a ridge of WHITENING_RIDGE x their mean
    square on its diagonal. Solved units x units, or, for more units than activations, M x M
    (the Woodbury identity), so that a wide vector node costs no more than its activations."""
    x, d = activations.astype(np.float64), directions.astype(np.float64)
    m, units = x.shape
    ridge = WHITENING_RIDGE * max(float(np.square(x).mean()), 1e-12)
    if units <= m:
        return np.linalg.solve(x.T @ x / m + ridge * np.eye(units), d.T).T
    # (ridge I + x'x / m)^-1 = (I - x' (m ridge I + x x')^-1 x) / ridge
    inner = np.linalg.solve(m * ridge * np.eye(m) + x @ x.T, x @ d.T)
    return (d - (x.T @ inner).T) / ridge


def _centre(maps: torch.Tensor) -> torch.Tensor:
    """N x C: the activation vector at the centre position (a vector node's vector)."""
    return maps if maps.dim() == 2 else maps[:, :, maps.shape[2] // 2, maps.shape[3] // 2]


def _dot_and_cosine(act: NodeActivations, targets: torch.Tensor):
    return dot_and_cosine(_centre(act.maps), targets)


def direction(targets: torch.Tensor, power: float = DIRECTION_POWER) -> Objective:
    """Batch element i's activation vector at the centre position against `targets[i]` (unit
    length): dot x cosine ** power, the cosine floored at CARICATURE_FLOOR (lucid's
    `direction_neuron_cossim`)."""

    def objective(act: NodeActivations, units: torch.Tensor) -> torch.Tensor:
        dot, cos = _dot_and_cosine(act, targets)
        return dot * cos.clamp_min(CARICATURE_FLOOR) ** power

    return objective


def direction_cosine(targets: torch.Tensor) -> Objective:
    """The cosine of batch element i's centre activation vector with `targets[i]`."""
    return lambda act, units: _dot_and_cosine(act, targets)[1]


def render_directions(
    model: nn.Module,
    run: Run,
    node: Node,
    ids: list[int],
    targets: np.ndarray,
    *,
    size: int,
    iterations: int,
    seed: int,
    device: torch.device,
    batch_size: int | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Pictures (uint8 K x size x size x 3) of `targets` (K x units, whitened directions), each
    seeded by its id in `ids`: the engine's optimization, in batches of `batch_size` images (by
    default as many as the device's memory fits, as `render` does), halved on running out of
    memory."""
    if not ids:
        return np.zeros((0, size, size, 3), np.uint8)
    numerics = usable_numerics(model, run, node, size, device)
    if batch_size is None:
        batch_size = batch_size_for(model, run, node, size, device, numerics)
    aims = F.normalize(torch.from_numpy(targets).float(), dim=1).to(device)

    def chunk(start: int, stop: int, scaled) -> RenderResult:
        aim = aims[start:stop]
        return optimize(
            model, run, node, ids[start:stop], Technique(ATLAS, direction(aim)), size=size,
            iterations=iterations, seed=seed, device=device, numerics=numerics,
            progress=scaled, should_stop=should_stop, measure=direction_cosine(aim),
        )  # fmt: skip

    results = in_batches(len(ids), max(1, batch_size), device, chunk, progress)
    return np.concatenate([r.images for r in results])


def mosaic(cells: list[Cell], grid: int, size: int) -> np.ndarray:
    """The cells' pictures at their places on a grid x grid canvas of size-pixel tiles."""
    out = np.full((grid * size, grid * size, 3), EMPTY, np.uint8)
    for cell in cells:
        top, left = cell.row * size, cell.col * size
        out[top : top + size, left : left + size] = cell.image
    return out


def _layout_key(
    run: Run, node: str, layout_step: int, method: str, seed: int, samples: int
) -> ResultKey:
    probe = run.manifest.probe
    options = (
        ("version", ATLAS_VERSION),
        ("method", method),
        ("seed", seed),
        ("samples", samples),
        ("probe", probe.count if probe else 0),
    )
    return ResultKey(
        "atlas-layout", node, 0, options, ((layout_step, run.snapshot_version(layout_step)),)
    )


def _atlas_key(layout: ResultKey, step: int, version: str, settings: dict) -> ResultKey:
    return ResultKey(
        ATLAS,
        layout.node,
        0,
        layout.options + tuple(sorted(settings.items())),
        ((step, version), *layout.snapshots),
    )


def _cells(
    activations: np.ndarray, coords: np.ndarray, sources: np.ndarray, grid: int, min_count: int
) -> list[tuple[int, int, int, np.ndarray, list[int]]]:
    """(row, col, count, direction, examples) of each cell holding `min_count` activations or
    more, by row then column."""
    where = cell_indexes(coords, grid)
    flat = where[:, 0] * grid + where[:, 1]
    found = []
    for cell in np.unique(flat):
        members = np.flatnonzero(flat == cell)
        if len(members) < min_count:
            continue
        vectors = activations[members]
        mean = vectors.mean(0)
        typical = members[np.argsort(np.linalg.norm(vectors - mean, axis=1), kind="stable")]
        examples = list(dict.fromkeys(int(i) for i in sources[typical, 0]))
        row, col = divmod(int(cell), grid)
        found.append((row, col, len(members), mean.astype(np.float32), examples))
    return found


def _no_probe(run: Run) -> MicroscopeError:
    return MicroscopeError(
        f"run '{run.name}' has no probe images, which an activation atlas is made of: pass "
        "probe= (a few hundred training inputs) to tb_microscope.Logger"
    )


LAYOUT = {"coords", "sources", "layout"}  # the arrays a cached layout holds
STORED = {  # the arrays a cached atlas holds
    "coords", "sources", "layout", "rows", "cols", "counts", "directions", "images", "examples",
    "example_offsets", "units",
}  # fmt: skip


def _stored_atlas(arrays: dict[str, np.ndarray], **fields) -> Atlas:
    offsets = arrays["example_offsets"]
    cells = [
        Cell(
            int(arrays["rows"][i]),
            int(arrays["cols"][i]),
            int(arrays["counts"][i]),
            arrays["directions"][i],
            arrays["images"][i],
            [int(e) for e in arrays["examples"][offsets[i] : offsets[i + 1]]],
            [int(u) for u in arrays["units"][i]],
        )
        for i in range(len(arrays["rows"]))
    ]
    return Atlas(
        mosaic(cells, fields["grid"], fields["size"]),
        cells,
        arrays["coords"],
        arrays["sources"],
        layout_method=str(arrays["layout"]),
        **fields,
    )


def _atlas_arrays(atlas: Atlas) -> dict[str, np.ndarray]:
    units = atlas.cells[0].direction.shape[0] if atlas.cells else 0
    size = atlas.size
    examples = [e for cell in atlas.cells for e in cell.examples]
    return {
        "coords": atlas.coords,
        "sources": atlas.sources,
        "layout": np.array(atlas.layout_method),
        "rows": np.array([c.row for c in atlas.cells], np.int64),
        "cols": np.array([c.col for c in atlas.cells], np.int64),
        "counts": np.array([c.count for c in atlas.cells], np.int64),
        "directions": np.stack([c.direction for c in atlas.cells])
        if atlas.cells
        else np.zeros((0, units), np.float32),
        "images": np.stack([c.image for c in atlas.cells])
        if atlas.cells
        else np.zeros((0, size, size, 3), np.uint8),
        "examples": np.array(examples, np.int64),
        "example_offsets": np.cumsum([0] + [len(c.examples) for c in atlas.cells]),
        "units": np.array([c.units for c in atlas.cells], np.int64).reshape(len(atlas.cells), -1),
    }


@restores_torch_state
def activation_atlas(
    run: Run,
    step: int,
    node: str,
    *,
    grid: int = 20,
    size: int | None = None,
    iterations: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    layout_step: int | None = None,
    preview: bool = False,
    samples: int = MAX_SAMPLES,
    min_count: int = MIN_COUNT,
    layout_method: str = "auto",
    whiten: bool = True,
    cache_dir: str | RenderCache | None = None,
    model: nn.Module | None = None,
    layout_model: nn.Module | None = None,
    load_model: Callable[[int], nn.Module] | None = None,
    batch_size: int | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Atlas:
    """An activation atlas of `node` at `step` (see `Atlas` and this module's notes): up to
    `samples` activations on the run's probe images, laid out at `layout_step` (default: the
    last logged step) and kept for every step, binned on a `grid` x `grid` grid, each cell of
    `min_count` activations or more rendered as its (whitened, unless `whiten=False`) mean
    direction at `size` px for `iterations`.

    `size` and `iterations` default to QUALITIES["full"] (64 px, 128 iterations), or with
    `preview=True` to QUALITIES["preview"] (32 px, 24 iterations: a first look, most of whose
    cost is the layout, which the full atlas then reuses). `layout_method`: "auto" (UMAP where
    umap-learn is installed, else PCA, with a warning), "umap" or "pca" (see `embedding.py`).
    Cached with the run's renders (or under `cache_dir`): the same call again reads it back
    without loading a model. `model` and `layout_model` may pass the models at `step` and
    `layout_step` already loaded (the second is needed only when the layout is not cached and
    the steps differ), or `load_model(step)` load them (say, from a server's loaded models);
    `batch_size` bounds the pictures per optimization as for `render`;
    `progress` hears the fraction done now and then; `should_stop` is asked often, and
    `RenderCancelled` raised once it returns True. Needs the run's probe images (the Logger's
    `probe=`).
    """
    target = run.node(node)
    check_grid(grid)
    quality = QUALITIES["preview" if preview else "full"]
    size = check_size(quality.size if size is None else size)
    iterations = check_iterations(quality.iterations if iterations is None else iterations)
    for value, name, low in ((min_count, "min_count", 1), (samples, "samples", 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SettingError(f"{name} must be a whole number from {low} up, got {value!r}")
    canvas_for(run, size)  # refuses sizes the model cannot take, before any work
    version = run.snapshot_version(step)  # an unknown step: StepNotFoundError
    if layout_step is None:
        layout_step = run.steps[-1]
    method = resolve_method(layout_method)
    if run.manifest.probe is None:
        raise _no_probe(run)
    cache = cache_dir if isinstance(cache_dir, RenderCache) else RenderCache(run, cache_dir)
    layout_key = _layout_key(run, target.name, layout_step, method, seed, samples)
    settings = {"grid": grid, "size": size, "iterations": iterations, "min_count": min_count}
    key = _atlas_key(layout_key, step, version, {**settings, "whiten": whiten})
    fields = {"step": step, "node": target.name, "grid": grid, "layout_step": layout_step}
    fields.update(size=size, iterations=iterations)
    stored = cache.get_arrays(key)
    if stored is not None and STORED <= set(stored):
        return _stored_atlas(stored, **fields)
    images = run.probe_images()
    if images is None:
        raise _no_probe(run)

    def report(fraction: float) -> None:
        if progress is not None:
            progress(fraction)

    report(0.0)
    device = torch.device(device) if device is not None else default_device()
    if load_model is None:

        def load_model(at: int) -> nn.Module:
            return run.load_model(at, device)

    model = frozen(model if model is not None else load_model(step))
    activations, sources = sampled_activations(
        run, model, target, images, seed, device, samples, should_stop
    )
    layout = cache.get_arrays(layout_key)
    if layout is not None and LAYOUT <= set(layout) and np.array_equal(layout["sources"], sources):
        coords, used = layout["coords"], str(layout["layout"])
    else:
        fitted_on = activations
        if layout_step != step:
            other = frozen(layout_model if layout_model is not None else load_model(layout_step))
            fitted_on, _ = sampled_activations(
                run, other, target, images, seed, device, samples, should_stop
            )
            del other
        check_stop(should_stop, "the atlas")
        coords, used = embed(fitted_on, method, seed)
        cache.put_arrays(
            layout_key, {"coords": coords, "sources": sources, "layout": np.array(used)}
        )
    report(0.1)
    found = _cells(activations, coords, sources, grid, min_count)
    directions = np.stack([f[3] for f in found]) if found else np.zeros((0, target.units))
    targets = whitened(directions, activations) if whiten and found else directions
    pictures = render_directions(
        model,
        run,
        target,
        [row * grid + col for row, col, *_ in found],
        targets.astype(np.float32),
        size=size,
        iterations=iterations,
        seed=seed,
        device=device,
        batch_size=batch_size,
        progress=lambda fraction: report(0.1 + 0.9 * fraction),
        should_stop=should_stop,
    )
    nearest = nearest_units(directions, activations)
    cells = [
        Cell(*cell[:4], picture, cell[4], [int(u) for u in units])
        for cell, picture, units in zip(found, pictures, nearest)
    ]
    atlas = Atlas(mosaic(cells, grid, size), cells, coords, sources, layout_method=used, **fields)
    cache.put_arrays(key, _atlas_arrays(atlas))
    report(1.0)
    return atlas
