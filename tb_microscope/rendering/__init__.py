"""Rendering: feature visualizations, dataset examples, attribution, weights, unit histories and
activation atlases.

(DESIGN.md called this package `render/`; it is `rendering/` so that `tb_microscope.render` is
unambiguously the function.)
"""

from .atlas import Atlas, activation_atlas
from .attribution import attribution
from .cache import DiskBudget, RenderCache, RenderKey, ResultKey
from .dynamics import (
    Alignment,
    ModelDynamics,
    NodeDynamics,
    align_units,
    model_dynamics,
    node_dynamics,
)
from .engine import ENGINE_VERSION, ImageIndexError, RenderResult, UnitIndexError, render
from .examples import Example, dataset_examples
from .history import unit_history
from .sweep import render_cached
from .techniques import TECHNIQUES, get_technique
from .weights import Connection, unit_weights

__all__ = [
    "ENGINE_VERSION",
    "Alignment",
    "Atlas",
    "activation_atlas",
    "ModelDynamics",
    "NodeDynamics",
    "align_units",
    "attribution",
    "model_dynamics",
    "node_dynamics",
    "TECHNIQUES",
    "Connection",
    "DiskBudget",
    "Example",
    "ImageIndexError",
    "RenderCache",
    "RenderKey",
    "RenderResult",
    "ResultKey",
    "UnitIndexError",
    "dataset_examples",
    "get_technique",
    "render",
    "render_cached",
    "unit_history",
    "unit_weights",
]
