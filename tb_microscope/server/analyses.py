"""The analyses the render service computes on its workers: one adapter per kind of `Analysis`,
which calls the technique in `analysis/` with the worker's device and loaded models and turns
what it finds into the JSON result the cache keeps (an atlas also stores its picture beside it).

`ADAPTERS` maps an analysis's kind to its adapter; `PICTURED` names the kinds whose result has a
picture beside it.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..analysis.atlas import activation_atlas
from ..analysis.attribution import attribution_and_notes, heat_map
from ..analysis.concepts import (
    concept_attribution_and_notes,
    concept_examples,
    concepts,
    render_concepts,
)
from ..analysis.dynamics import align_units, model_dynamics, node_dynamics
from ..analysis.examples import dataset_examples
from ..analysis.history import unit_history
from ..analysis.weights import unit_weights
from ..execution.cache import RenderCache, encode_picture
from ..run import Run
from .models import DeviceModels
from .work import Analysis, RunChangedError

PICTURED = {"atlas", "concepts"}  # the analyses whose result has a picture beside it


class Host(Protocol):
    """What an adapter asks of the service it runs in: a run by its path, and a run's cache."""

    def run(self, path: str) -> Run: ...

    def cache(self, run: Run) -> RenderCache: ...


def _png_data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_picture(image)).decode()


def _examples_json(unit: int, found) -> dict:
    """Dataset examples (`Example`s) as the tab shows them: each image and crop a PNG data URL."""
    return {
        "unit": unit,
        "examples": [
            {
                "index": e.index,
                "activation": e.activation,
                "position": e.position,
                "box": e.box,
                "image": _png_data_url(e.image),
                "crop": _png_data_url(e.crop),
            }
            for e in found
        ],
    }


def _examples(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    step = work.option("step")
    found = dataset_examples(
        run,
        step,
        work.node,
        [work.unit],
        count=work.option("count"),
        device=models.device,
        model=models.get(run, step),
    )[work.unit]
    return _examples_json(work.unit, found)


def _weights(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    step = work.option("step")
    source, connections, _ = unit_weights(
        run,
        step,
        work.node,
        work.unit,
        source=work.option("source"),
        top=work.option("top"),
        device=models.device,
        model=models.get(run, step),
    )
    return {
        "unit": work.unit,
        "source": source,
        "connections": [
            {"node": c.node, "unit": c.unit, "strength": c.strength} for c in connections
        ],
    }


ATTRIBUTION_DIGITS = 4  # significant digits of the values an attribution result holds


def _significant(values: np.ndarray, digits: int = ATTRIBUTION_DIGITS) -> list[list[float]]:
    """Rows of floats rounded to `digits` significant digits: a result a quarter the size."""
    return [[float(f"{v:.{digits}g}") for v in row] for row in values.tolist()]


def _attribution(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    """A probe image's attribution to the unit at a step: the signed values per pixel (rounded),
    their range and sum, the heat map to overlay on the image (a PNG data URL), and what the
    tab should say of it (`notes`: guided backprop with no ReLU module to guide)."""
    step, image, method = work.option("step"), work.option("image"), work.option("method")
    values, notes = attribution_and_notes(
        run,
        step,
        work.node,
        work.unit,
        image,
        method=method,
        device=models.device,
        model=models.get(run, step),
        should_stop=should_stop,
    )
    return _attribution_json(work, values, notes)


def _attribution_json(work: Analysis, values: np.ndarray, notes: list[str]) -> dict:
    height, width = values.shape
    return {
        "unit": work.unit,
        "step": work.option("step"),
        "image": work.option("image"),
        "method": work.option("attribution") or work.option("method"),
        "height": height,
        "width": width,
        "values": _significant(values),
        "min": float(values.min()),
        "max": float(values.max()),
        "sum": float(values.sum(dtype=np.float64)),
        "overlay": _png_data_url(heat_map(values)),
        "notes": notes,
    }


def _atlas(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    """The node's activation atlas at the work's step (laid out at its `layout_step`): what
    `Atlas.to_dict` holds, and the picture (empty cells transparent) stored beside it."""
    found = activation_atlas(
        run,
        work.option("step"),
        work.node,
        grid=work.option("grid"),
        size=work.option("size"),
        iterations=work.option("iterations"),
        preview=work.preview,
        layout_step=work.option("layout_step"),
        device=models.device,
        cache_dir=service.cache(run),
        load_model=lambda step: models.get(run, step),
        progress=progress,
        should_stop=should_stop,
    )
    service.cache(run).put_picture(work.result_key, found.rgba())
    return found.to_dict()


def _fitted_concepts(service: Host, run: Run, work: Analysis, models: DeviceModels, **options):
    """The node's concepts at the work's step, matched to its `reference_step` (the fits are
    cached with the run's renders, so a second look loads no model)."""
    return concepts(
        run,
        work.option("step"),
        work.node,
        count=work.option("count"),
        method=work.option("method"),
        reference_step=work.option("reference_step"),
        device=models.device,
        cache_dir=service.cache(run),
        load_model=lambda step: models.get(run, step),
        **options,
    )


def _concepts(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    """The node's concepts at the work's step: what `Concepts.to_dict` holds and `size`, the
    side of a concept's picture; the pictures (concept k at k x size from the left, rendered
    as an atlas's cells are) are stored beside it as one strip."""
    found = _fitted_concepts(
        service, run, work, models, progress=lambda f: progress(f / 2), should_stop=should_stop
    )
    pictures = render_concepts(
        run,
        found,
        size=work.option("size"),
        iterations=work.option("iterations"),
        device=models.device,
        cache_dir=service.cache(run),
        model=models.get(run, found.step),
        progress=lambda f: progress(0.5 + f / 2),
        should_stop=should_stop,
    )
    service.cache(run).put_picture(work.result_key, np.concatenate(list(pictures), axis=1))
    return {**found.to_dict(), "size": int(pictures.shape[1])}


def _concept_examples(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    """Concept `work.unit`'s dataset examples at the work's step: its strongest probe images,
    each with the box of pixels its strongest position depends on, as a unit's examples are."""
    found = _fitted_concepts(service, run, work, models, should_stop=should_stop)
    k = work.unit
    one = dataclasses.replace(
        found,
        directions=found.directions[[k]],
        top=found.top[[k], : work.option("examples")],
        similarity=found.similarity[[k]],
        codes=found.codes[:, [k]],
        targets=found.targets[[k]],
    )
    (examples,) = concept_examples(
        run, one, count=work.option("examples"), device=models.device,
        model=models.get(run, found.step),
    )  # fmt: skip
    return _examples_json(k, examples)


def _concept_attribution(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    """Which pixels of probe image `image` drive concept `work.unit` at the work's step (its
    direction's projection as the objective, by the `attribution` method), as a unit's
    attribution result has it (`unit` is the concept; `method` the attribution method)."""
    found = _fitted_concepts(service, run, work, models, should_stop=should_stop)
    values, notes = concept_attribution_and_notes(
        run, found, work.unit, work.option("image"), method=work.option("attribution"),
        device=models.device, model=models.get(run, found.step), should_stop=should_stop,
    )  # fmt: skip
    return _attribution_json(work, values, notes)


def _history(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    steps = [step for step, _ in work.snapshots]
    history = unit_history(
        run, work.node, work.unit, steps=steps, device=models.device, should_stop=should_stop
    )
    return {"unit": work.unit, "history": history}


def _dynamics(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    """A node's dynamics (`work.node`), or every node's CKA (no node), over the work's steps."""
    options = dict(
        steps=[step for step, _ in work.snapshots],
        device=models.device,
        cache_dir=service.cache(run),
        should_stop=should_stop,
    )
    if work.node:
        return node_dynamics(run, work.node, **options).to_dict()
    return model_dynamics(run, **options).to_dict()


def _align(
    service: Host, run: Run, work: Analysis, models: DeviceModels, should_stop, progress
) -> dict:
    """The node's units at the work's step matched with those of the other run at its step."""
    other = service.run(work.option("other"))
    if other.id != work.option("other_id") or other.snapshot_version(
        work.option("other_step")
    ) != work.option("other_version"):
        raise RunChangedError(f"run '{other.name}' was logged again while this waited; ask again")
    ((step, _),) = work.snapshots
    found = align_units(
        run,
        step,
        other,
        work.option("other_step"),
        work.node,
        device=models.device,
        should_stop=should_stop,
    )
    return found.to_dict()


Analyze = Callable[
    [Host, Run, Analysis, DeviceModels, Callable[[], bool], Callable[[float], None]], dict
]
ADAPTERS: dict[str, Analyze] = {
    "examples": _examples,
    "weights": _weights,
    "history": _history,
    "attribution": _attribution,
    "atlas": _atlas,
    "concepts": _concepts,
    "concept-examples": _concept_examples,
    "concept-attribution": _concept_attribution,
    "dynamics": _dynamics,
    "align": _align,
}
